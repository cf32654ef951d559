-- An index written by the node before its SQLAlchemy/Alembic schema (commit 8c75b67 plus the fast-path
-- work): three instances of one study, a running job, a pending delivery, counters, the installation UID.
-- tests/test_index_migrations.py upgrades it.
BEGIN TRANSACTION;
CREATE TABLE associations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    calling_ae TEXT,
    called_ae TEXT,
    peer TEXT,
    started_at REAL NOT NULL,
    ended_at REAL,
    instances INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0
);
INSERT INTO "associations" VALUES(1,'MODALITY','NODE','127.0.0.1',1790000000.0,1790000003.0,3,0);
CREATE TABLE installation (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
INSERT INTO "installation" VALUES('uid','2.25.253578325615076737861759670114498984582');
CREATE TABLE instances (
    sop_instance_uid TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    received_at REAL NOT NULL,
    calling_ae TEXT,
    called_ae TEXT,
    peer TEXT,
    association_id INTEGER
);
INSERT INTO "instances" VALUES('1.2.826.0.1.3680043.8.498.1.1.0','1.2.826.0.1.3680043.8.498.1.1','1.2.826.0.1.3680043.8.498.1','1.2.840.10008.5.1.4.1.1.2','1.2.840.10008.1.2.1','spool/1.2.826.0.1.3680043.8.498.1/0.dcm',1000,1790000000.0,'MODALITY','NODE','127.0.0.1',NULL);
INSERT INTO "instances" VALUES('1.2.826.0.1.3680043.8.498.1.1.1','1.2.826.0.1.3680043.8.498.1.1','1.2.826.0.1.3680043.8.498.1','1.2.840.10008.5.1.4.1.1.2','1.2.840.10008.1.2.1','spool/1.2.826.0.1.3680043.8.498.1/1.dcm',1001,1790000001.0,'MODALITY','NODE','127.0.0.1',NULL);
INSERT INTO "instances" VALUES('1.2.826.0.1.3680043.8.498.1.1.2','1.2.826.0.1.3680043.8.498.1.1','1.2.826.0.1.3680043.8.498.1','1.2.840.10008.5.1.4.1.1.2','1.2.840.10008.1.2.1','spool/1.2.826.0.1.3680043.8.498.1/2.dcm',1002,1790000002.0,'MODALITY','NODE','127.0.0.1',NULL);
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_key TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    destination TEXT NOT NULL,
    files TEXT NOT NULL,                 -- JSON list of result files
    state TEXT NOT NULL,                 -- pending | sending | delivered | dead
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    next_attempt REAL NOT NULL,
    deadline REAL NOT NULL,
    last_error TEXT,
    warnings TEXT,
    UNIQUE (job_key, destination)
);
INSERT INTO "outbox" VALUES(1,'1:rule:seg','1.2.826.0.1.3680043.8.498.1','pacs','["results/1/seg.dcm"]','pending',0,1.79533971415445685391e+09,1.79533971415445685391e+09,1.79533971415445685391e+09,1.79542611415445685385e+09,NULL,NULL);
CREATE TABLE receive_counts (
    kind TEXT NOT NULL,
    detail TEXT NOT NULL,
    n INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (kind, detail)
);
INSERT INTO "receive_counts" VALUES('cstore_failure','0xA700',1);
INSERT INTO "receive_counts" VALUES('cstore_failure','x',1);
CREATE TABLE retention_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    kind TEXT NOT NULL,                 -- instances | results
    study_uid TEXT NOT NULL,
    job_id INTEGER,
    reason TEXT NOT NULL,
    instances INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0,
    completions INTEGER NOT NULL DEFAULT 0,
    files INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE retention_runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    studies INTEGER NOT NULL,
    instances INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    result_files INTEGER NOT NULL
);
CREATE TABLE series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    modality TEXT,
    body_part TEXT,
    description TEXT,
    number INTEGER,
    sop_class_uid TEXT,
    image_type TEXT,
    orientation TEXT,
    rows INTEGER,
    columns INTEGER,
    slice_thickness REAL
);
INSERT INTO "series" VALUES('1.2.826.0.1.3680043.8.498.1.1','1.2.826.0.1.3680043.8.498.1','CT',NULL,NULL,1,'1.2.840.10008.5.1.4.1.1.2',NULL,NULL,32,32,2.0);
CREATE TABLE studies (
    study_uid TEXT PRIMARY KEY,
    patient_id TEXT,
    state TEXT NOT NULL,               -- receiving | complete
    calling_ae TEXT,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    deadline REAL NOT NULL,            -- last_received + quiet period
    completed_at REAL,
    completions INTEGER NOT NULL DEFAULT 0
);
INSERT INTO "studies" VALUES('1.2.826.0.1.3680043.8.498.1','PID-FIXTURE','complete','MODALITY',1790000000.0,1790000002.0,1790000062.0,1790000100.0,1);
CREATE TABLE work_items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    reason TEXT,
    priority INTEGER NOT NULL DEFAULT 0,
    rules_version TEXT,
    decision TEXT,
    explanation TEXT,
    stages TEXT
, stage TEXT, attempts INTEGER NOT NULL DEFAULT 0, next_attempt REAL, retry_deadline REAL, outputs TEXT);
INSERT INTO "work_items" VALUES(1,'1.2.826.0.1.3680043.8.498.1','running',1790000100.0,1790000100.0,'no routing rule applies',0,'abc123','{"rules_version":"abc123","mode":"first","priority":0,"applied":[],"outcomes":[],"explanation":"no rule"}','no rule','{"route": [1790000100.0, 1795339714.1534812]}','inference',1,NULL,NULL,'{}');
CREATE INDEX studies_state ON studies(state, deadline);
CREATE INDEX series_study ON series(study_uid);
CREATE INDEX instances_study ON instances(study_uid);
CREATE INDEX instances_series ON instances(series_uid);
CREATE INDEX work_items_state ON work_items(state, priority, id);
CREATE INDEX outbox_due ON outbox(state, next_attempt);
DELETE FROM "sqlite_sequence";
INSERT INTO "sqlite_sequence" VALUES('associations',1);
INSERT INTO "sqlite_sequence" VALUES('work_items',1);
INSERT INTO "sqlite_sequence" VALUES('outbox',1);
COMMIT;
