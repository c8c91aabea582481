-- A records database as pbmd wrote it at schema version 2 (before foreign keys and
-- the application id): sessions completed, faulted and reconciled from counters.
BEGIN TRANSACTION;
CREATE TABLE changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    tbl TEXT NOT NULL,
    key TEXT NOT NULL,
    utc TEXT NOT NULL,
    UNIQUE (tbl, key)
);
INSERT INTO "changes" VALUES(2,'events','0fcb163b-20ca-466f-ab0d-b0b516c09c6a','2026-12-07T01:41:02.674Z');
INSERT INTO "changes" VALUES(6,'emissions','1','2026-12-07T01:41:02.675Z');
INSERT INTO "changes" VALUES(12,'emissions','2','2026-12-07T01:41:02.675Z');
INSERT INTO "changes" VALUES(18,'emissions','3','2026-12-07T01:41:02.675Z');
INSERT INTO "changes" VALUES(21,'steps','v2-completed/1/0','2026-12-07T01:41:02.675Z');
INSERT INTO "changes" VALUES(22,'steps','v2-completed/1/1','2026-12-07T01:41:02.675Z');
INSERT INTO "changes" VALUES(23,'steps','v2-completed/4/0','2026-12-07T01:41:02.675Z');
INSERT INTO "changes" VALUES(24,'sessions','v2-completed','2026-12-07T01:41:02.675Z');
INSERT INTO "changes" VALUES(29,'emissions','4','2026-12-07T01:41:02.675Z');
INSERT INTO "changes" VALUES(35,'emissions','5','2026-12-07T01:41:02.676Z');
INSERT INTO "changes" VALUES(38,'events','7e69526e-fec2-4c0e-ba0a-2d5aa993fb0f','2026-12-07T01:41:02.676Z');
INSERT INTO "changes" VALUES(42,'emissions','6','2026-12-07T01:41:02.676Z');
INSERT INTO "changes" VALUES(45,'steps','v2-faulted/1/0','2026-12-07T01:41:02.676Z');
INSERT INTO "changes" VALUES(46,'steps','v2-faulted/4/0','2026-12-07T01:41:02.676Z');
INSERT INTO "changes" VALUES(47,'steps','v2-faulted/1/1','2026-12-07T01:41:02.676Z');
INSERT INTO "changes" VALUES(48,'sessions','v2-faulted','2026-12-07T01:41:02.676Z');
INSERT INTO "changes" VALUES(50,'emissions','7','2026-12-07T01:41:02.676Z');
INSERT INTO "changes" VALUES(51,'sessions','v2-reconciled','2026-12-07T01:41:02.676Z');
INSERT INTO "changes" VALUES(52,'events','22069c57-3069-4bfa-9f5b-0622263c926c','2026-12-07T01:41:02.676Z');
CREATE TABLE emissions (
        seq INTEGER PRIMARY KEY,
        session_id TEXT NOT NULL,
        port INTEGER NOT NULL,
        device_port INTEGER,
        step_index INTEGER,
        origin TEXT NOT NULL DEFAULT 'host' CHECK (origin IN ('host', 'counters')),
        wavelength_nm INTEGER,
        mode TEXT,
        power_uw INTEGER,
        pulse_hz INTEGER,
        duty_permille INTEGER,
        energy_budget_uj INTEGER,
        max_duration_ms INTEGER,
        started_utc TEXT NOT NULL,
        started_device_time_us INTEGER,
        progress_utc TEXT,
        progress_device_time_us INTEGER,
        host_energy_uj INTEGER,
        controller_energy_uj INTEGER,
        controller_energy_source TEXT CHECK (controller_energy_source IN
            ('telemetry', 'stopped', 'provisional', 'counters')),
        controller_port_session_uj INTEGER,
        duration_ms INTEGER,
        stop_reason TEXT,
        stop_reason_code INTEGER,
        host_stop_cause TEXT,
        ended_utc TEXT,
        ended_device_time_us INTEGER
    );
INSERT INTO "emissions" VALUES(1,'v2-completed',1,1,0,'host',660,'continuous',1800000,0,0,756000000,480000,'2023-11-14T22:13:30.000000Z',1700000010000000,'2026-12-07T01:41:02.671067Z',1700000373454545,720360000,719640000,'stopped',NULL,399800,'host_stop',1,'dose reached','2023-11-14T22:20:09.800000Z',NULL);
INSERT INTO "emissions" VALUES(2,'v2-completed',1,1,1,'host',830,'continuous',2700000,0,0,756000000,320000,'2023-11-14T22:20:20.000000Z',1700000420000000,'2026-12-07T01:41:02.671197Z',1700000662666666,720000000,720720000,'stopped',NULL,266933,'host_stop',1,'dose reached','2023-11-14T22:24:46.933333Z',NULL);
INSERT INTO "emissions" VALUES(3,'v2-completed',4,4,0,'host',905,'pulsed',200000,10000,2,4200000,24000,'2023-11-14T22:13:30.000000Z',1700000010000000,'2026-12-07T01:41:02.671296Z',1700000028172727,4002000,3998000,'stopped',NULL,19990,'host_stop',1,'dose reached','2023-11-14T22:13:49.990000Z',NULL);
INSERT INTO "emissions" VALUES(4,'v2-faulted',1,1,0,'host',660,'continuous',1800000,0,0,756000000,480000,'2023-11-14T22:13:30.000000Z',1700000010000000,'2026-12-07T01:41:02.671492Z',1700000373686868,720000000,720100000,'stopped',NULL,400056,'host_stop',1,'dose reached','2023-11-14T22:20:10.055556Z',NULL);
INSERT INTO "emissions" VALUES(5,'v2-faulted',4,4,0,'host',905,'pulsed',200000,10000,2,4200000,24000,'2023-11-14T22:13:30.000000Z',1700000010000000,'2026-12-07T01:41:02.671586Z',1700000029090909,3700000,4200000,'stopped',NULL,21000,'energy_budget',2,'ended by the controller','2023-11-14T22:13:51.000000Z',NULL);
INSERT INTO "emissions" VALUES(6,'v2-faulted',1,1,1,'host',830,'continuous',2700000,0,0,756000000,320000,'2023-11-14T22:20:20.000000Z',1700000420000000,'2026-12-07T01:41:02.671706Z',1700000483973064,180000000,190000000,'stopped',NULL,70370,'all_off',9,'trip E105','2023-11-14T22:21:30.370370Z',NULL);
INSERT INTO "emissions" VALUES(7,'v2-reconciled',4,NULL,NULL,'counters',NULL,NULL,NULL,NULL,NULL,NULL,NULL,'2026-12-07T01:41:02.671794Z',NULL,NULL,NULL,NULL,2500000,'counters',2500000,NULL,NULL,NULL,'unrecorded (reconciled from the controller counters)','2026-12-07T01:41:02.671794Z',NULL);
CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        session_id TEXT,
        utc TEXT NOT NULL,
        device_time_us INTEGER,
        kind TEXT NOT NULL,
        code TEXT,
        port INTEGER,
        severity TEXT NOT NULL
            CHECK (severity IN ('debug', 'info', 'warning', 'error', 'critical')),
        message TEXT NOT NULL,
        data_json TEXT
    );
INSERT INTO "events" VALUES(1,'0fcb163b-20ca-466f-ab0d-b0b516c09c6a','v2-completed','2023-11-14T22:13:21.000000Z',NULL,'state',NULL,NULL,'info','session running',NULL);
INSERT INTO "events" VALUES(2,'7e69526e-fec2-4c0e-ba0a-2d5aa993fb0f','v2-faulted','2023-11-14T22:21:40.000000Z',NULL,'trip','E105',1,'error','The daemon''s and the controller''s dose measurements disagree.',NULL);
INSERT INTO "events" VALUES(3,'22069c57-3069-4bfa-9f5b-0622263c926c',NULL,'2026-12-07T01:41:02.671817Z',NULL,'controller',NULL,NULL,'info','controller ready',NULL);
CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        event_id TEXT NOT NULL UNIQUE,
        published_utc TEXT
    );
INSERT INTO "outbox" VALUES(1,'0fcb163b-20ca-466f-ab0d-b0b516c09c6a',NULL);
INSERT INTO "outbox" VALUES(2,'7e69526e-fec2-4c0e-ba0a-2d5aa993fb0f',NULL);
INSERT INTO "outbox" VALUES(3,'22069c57-3069-4bfa-9f5b-0622263c926c',NULL);
CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        started_utc TEXT NOT NULL,
        ended_utc TEXT,
        state TEXT NOT NULL,
        outcome TEXT CHECK (outcome IN ('completed', 'aborted', 'faulted', 'interrupted')),
        stop_cause_code TEXT,
        stop_cause_message TEXT,
        protocol_id TEXT NOT NULL,
        protocol_version INTEGER NOT NULL,
        protocol_title TEXT,
        protocol_sha256 TEXT NOT NULL,
        signing_key_id TEXT,
        plan_hash TEXT NOT NULL,
        plan_json TEXT NOT NULL,
        patient_ref TEXT NOT NULL,
        operator TEXT,
        contraindications_json TEXT NOT NULL,
        ports_json TEXT NOT NULL,
        controller_serial TEXT,
        controller_firmware TEXT,
        session_token INTEGER,
        course_sessions INTEGER,
        course_interval_days REAL,
        time_scale REAL NOT NULL DEFAULT 1.0,
        notes TEXT
    );
INSERT INTO "sessions" VALUES('v2-completed','2023-11-14T22:13:20.000000Z','2023-11-14T22:25:00.000000Z','completed','completed',NULL,NULL,'chronic-lumbar',3,'Chronic low back pain, lumbar','aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa','RWTtestkey','bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb','{"ports":{"1":[],"4":[]}}','PAT-0042','dr.lee','{"cancer":null,"epilepsy":false,"pregnancy":false}','[{"applicator_kind":"pad","applicator_serial":"DUO-1001","beam_area_cm2":180.0,"channels_nm":[660,830],"controller":null,"controller_firmware":null,"controller_serial":null,"port":1},{"applicator_kind":"probe","applicator_serial":"P905-7","beam_area_cm2":0.5,"channels_nm":[905],"controller":null,"controller_firmware":null,"controller_serial":null,"port":4}]','SIM-0001','1.2.3',12648430,10,2.0,60.0,NULL);
INSERT INTO "sessions" VALUES('v2-faulted','2023-11-14T22:13:20.000000Z','2023-11-14T22:21:41.000000Z','faulted','faulted','E105','The daemon''s and the controller''s dose measurements disagree.','chronic-lumbar',3,'Chronic low back pain, lumbar','aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa',NULL,'bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb','{"ports":{"1":[],"4":[]}}','PAT-0042','dr.lee','{"cancer":null,"epilepsy":false,"pregnancy":false}','[{"applicator_kind":"pad","applicator_serial":"DUO-1001","beam_area_cm2":180.0,"channels_nm":[660,830],"controller":null,"controller_firmware":null,"controller_serial":null,"port":1},{"applicator_kind":"probe","applicator_serial":"P905-7","beam_area_cm2":0.5,"channels_nm":[905],"controller":null,"controller_firmware":null,"controller_serial":null,"port":4}]','SIM-0001','1.2.3',12648430,10,2.0,60.0,NULL);
INSERT INTO "sessions" VALUES('v2-reconciled','2023-11-14T22:13:20.000000Z','2026-12-07T01:41:02.671802Z','interrupted','interrupted','E902','daemon restarted during the session','chronic-lumbar',3,'Chronic low back pain, lumbar','aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa','RWTtestkey','bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb','{"ports":{"1":[],"4":[]}}','PAT-0042','dr.lee','{"cancer":null,"epilepsy":false,"pregnancy":false}','[{"applicator_kind":"pad","applicator_serial":"DUO-1001","beam_area_cm2":180.0,"channels_nm":[660,830],"controller":null,"controller_firmware":null,"controller_serial":null,"port":1},{"applicator_kind":"probe","applicator_serial":"P905-7","beam_area_cm2":0.5,"channels_nm":[905],"controller":null,"controller_firmware":null,"controller_serial":null,"port":4}]','SIM-0001','1.2.3',12648430,10,2.0,60.0,NULL);
CREATE TABLE steps (
        session_id TEXT NOT NULL,
        port INTEGER NOT NULL,
        step_index INTEGER NOT NULL,
        site TEXT NOT NULL,
        site_label TEXT,
        region TEXT,
        area_covered_cm2 REAL,
        technique TEXT,
        wavelength_nm INTEGER NOT NULL,
        mode TEXT NOT NULL,
        pulse_hz REAL,
        duty_permille INTEGER,
        pulse_width_ns REAL,
        peak_power_mw REAL,
        power_setpoint_mw REAL NOT NULL,
        area_cm2 REAL NOT NULL,
        target_kind TEXT NOT NULL,
        target_value REAL NOT NULL,
        prescribed_energy_j REAL,
        prescribed_fluence_j_cm2 REAL,
        planned_time_s REAL,
        max_time_s REAL,
        delivered_host_j REAL,
        delivered_controller_j REAL,
        delivered_fluence_j_cm2 REAL,
        mean_irradiance_mw_cm2 REAL,
        emitting_time_s REAL,
        outcome TEXT CHECK (outcome IN
            ('completed', 'aborted', 'faulted', 'interrupted', 'skipped')),
        stop_cause_code TEXT,
        stop_cause_message TEXT,
        started_utc TEXT NOT NULL,
        ended_utc TEXT,
        PRIMARY KEY (session_id, port, step_index)
    );
INSERT INTO "steps" VALUES('v2-completed',1,0,'lumbar-pad','Lumbar, L1–S1','lumbar',180.0,'contact',660,'continuous',NULL,NULL,NULL,NULL,1800.0,180.0,'fluence_j_cm2',4.0,720.0,4.0,400.0,480.0,720.36,719.64,3.99799999999999977617e+00,10.0,399.8,'completed',NULL,NULL,'2023-11-14T22:13:30.000000Z','2023-11-14T22:20:09.800000Z');
INSERT INTO "steps" VALUES('v2-completed',1,1,'lumbar-pad','Lumbar, L1–S1','lumbar',180.0,'contact',830,'continuous',NULL,NULL,NULL,NULL,2700.0,180.0,'fluence_j_cm2',4.0,720.0,4.0,266.667,3.20000399999999956429e+02,720.0,720.72,4.00400000000000044764e+00,1.50000187312921227089e+01,266.933,'completed',NULL,NULL,'2023-11-14T22:20:20.000000Z','2023-11-14T22:24:46.933333Z');
INSERT INTO "steps" VALUES('v2-completed',4,0,'l4-left','L4, left paraspinal','lumbar',1.0,'contact',905,'pulsed',10000.0,2,NULL,100000.0,200.0,0.5,'energy_j',4.0,4.0,8.0,20.0,24.0,4.002,3.998,7.996,4.00000000000000056855e+02,19.99,'completed',NULL,NULL,'2023-11-14T22:13:30.000000Z','2023-11-14T22:13:49.990000Z');
INSERT INTO "steps" VALUES('v2-faulted',1,0,'lumbar-pad','Lumbar, L1–S1','lumbar',180.0,'contact',660,'continuous',NULL,NULL,NULL,NULL,1800.0,180.0,'fluence_j_cm2',4.0,720.0,4.0,400.0,480.0,720.0,720.1,4.00055555555555564239e+00,9.99998889044422689664e+00,400.056,'completed',NULL,NULL,'2023-11-14T22:13:30.000000Z','2023-11-14T22:20:10.055556Z');
INSERT INTO "steps" VALUES('v2-faulted',4,0,'l4-left','L4, left paraspinal','lumbar',1.0,'contact',905,'pulsed',10000.0,2,NULL,100000.0,200.0,0.5,'energy_j',4.0,4.0,8.0,20.0,24.0,3.7,4.2,8.4,400.0,21.0,'faulted','E404','A backup dose channel ended an emission before the prescribed dose.','2023-11-14T22:13:30.000000Z','2023-11-14T22:13:51.000000Z');
INSERT INTO "steps" VALUES('v2-faulted',1,1,'lumbar-pad','Lumbar, L1–S1','lumbar',180.0,'contact',830,'continuous',NULL,NULL,NULL,NULL,2700.0,180.0,'fluence_j_cm2',4.0,720.0,4.0,266.667,3.20000399999999956429e+02,180.0,190.0,1.05555555555555558022e+00,1.50000789477839333585e+01,70.37,'faulted','E105','The daemon''s and the controller''s dose measurements disagree.','2023-11-14T22:20:20.000000Z','2023-11-14T22:21:30.370370Z');
CREATE INDEX sessions_started ON sessions (started_utc);
CREATE INDEX sessions_unfinished ON sessions (started_utc) WHERE ended_utc IS NULL;
CREATE INDEX emissions_session ON emissions (session_id, port, seq);
CREATE INDEX events_session ON events (session_id, seq);
CREATE INDEX outbox_pending ON outbox (seq) WHERE published_utc IS NULL;
CREATE TRIGGER changes_sessions_insert AFTER INSERT ON sessions BEGIN INSERT OR REPLACE INTO changes (tbl, key, utc) VALUES ('sessions', NEW.id, strftime('%Y-%m-%dT%H:%M:%fZ', 'now')); END;
CREATE TRIGGER changes_sessions_update AFTER UPDATE ON sessions BEGIN INSERT OR REPLACE INTO changes (tbl, key, utc) VALUES ('sessions', NEW.id, strftime('%Y-%m-%dT%H:%M:%fZ', 'now')); END;
CREATE TRIGGER changes_steps_insert AFTER INSERT ON steps BEGIN INSERT OR REPLACE INTO changes (tbl, key, utc) VALUES ('steps', NEW.session_id || '/' || NEW.port || '/' || NEW.step_index, strftime('%Y-%m-%dT%H:%M:%fZ', 'now')); END;
CREATE TRIGGER changes_steps_update AFTER UPDATE ON steps BEGIN INSERT OR REPLACE INTO changes (tbl, key, utc) VALUES ('steps', NEW.session_id || '/' || NEW.port || '/' || NEW.step_index, strftime('%Y-%m-%dT%H:%M:%fZ', 'now')); END;
CREATE TRIGGER changes_emissions_insert AFTER INSERT ON emissions BEGIN INSERT OR REPLACE INTO changes (tbl, key, utc) VALUES ('emissions', NEW.seq, strftime('%Y-%m-%dT%H:%M:%fZ', 'now')); END;
CREATE TRIGGER changes_emissions_update AFTER UPDATE ON emissions BEGIN INSERT OR REPLACE INTO changes (tbl, key, utc) VALUES ('emissions', NEW.seq, strftime('%Y-%m-%dT%H:%M:%fZ', 'now')); END;
CREATE TRIGGER changes_events_insert AFTER INSERT ON events BEGIN INSERT OR REPLACE INTO changes (tbl, key, utc) VALUES ('events', NEW.id, strftime('%Y-%m-%dT%H:%M:%fZ', 'now')); END;
CREATE TRIGGER changes_events_update AFTER UPDATE ON events BEGIN INSERT OR REPLACE INTO changes (tbl, key, utc) VALUES ('events', NEW.id, strftime('%Y-%m-%dT%H:%M:%fZ', 'now')); END;
DELETE FROM "sqlite_sequence";
INSERT INTO "sqlite_sequence" VALUES('changes',52);
INSERT INTO "sqlite_sequence" VALUES('events',3);
INSERT INTO "sqlite_sequence" VALUES('outbox',3);
COMMIT;
PRAGMA user_version = 2;
