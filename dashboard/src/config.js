// The broker this page connects to. `pbmd dashboard` writes this file; the query
// string may override it (?broker=ws://host:9001&username=dashboard&password=...).
// Empty url: ws://<the host this page came from>:9001.
window.PBM_DASHBOARD = { url: "", username: "", password: "", topicRoot: "pbm/v1" };
