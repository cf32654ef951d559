-- Orthanc forwards every series to the node by itself once it is stable (no new instance for
-- StableAge seconds), except the series the node produced (its SEG and SR results come back
-- into the same study and must not be sent to it again). The node assembles the study from
-- its series with its own quiet period. Loaded through ORTHANC__LUA_SCRIPTS (docker-compose.yml).
NODE_MODALITY = 'node'          -- the DicomModalities entry of the node
NODE_MANUFACTURER = 'dicom-node' -- the node's output.manufacturer

function OnStableSeries(seriesId, tags, metadata)
  if tags['Manufacturer'] == NODE_MANUFACTURER then
    return
  end
  RestApiPost('/modalities/' .. NODE_MODALITY .. '/store',
              DumpJson({ Resources = { seriesId }, Synchronous = false }, true))
end
