"""What every layer of the node uses: structured logs and YAML files with line-numbered errors.

The bottom of the import graph: `common` imports none of `node`, `inference` or `training`,
so the inference and training packages can be used (and tested) without the node.
"""
