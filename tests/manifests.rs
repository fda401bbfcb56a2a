//! The deployment files agree with each other and with the proxy: the Kubernetes manifests under
//! `deploy/kubernetes/` (probes on the admin port of the ConfigMap's proxy.toml, a grace period
//! longer than the drain, security context, Secret wiring, selectors) and the `Dockerfile`
//! (stages, non-root user, health check, baked configuration). Docker and a cluster are not
//! needed: the files are parsed, and the configurations are validated with `Config::parse`.
//! The alert rules and the dashboard (`deploy/prometheus/`, `deploy/grafana/`) are checked in
//! `manifests/observability.rs`.

#[path = "manifests/fleet.rs"]
mod fleet;
#[path = "manifests/observability.rs"]
mod observability;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_yaml_ng::Value;
use sitecore_auth_proxy::config::Config;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn kube_dir() -> PathBuf {
    repo().join("deploy").join("kubernetes").join("base")
}

/// One YAML document and the file it came from.
struct Doc {
    file: String,
    value: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        str_at(&self.value, "kind").unwrap_or("")
    }

    fn name(&self) -> &str {
        str_at(&self.value, "metadata.name").unwrap_or("")
    }
}

/// Every document of every `.yaml`/`.yml` file of deploy/kubernetes/base, in file name order.
fn manifests() -> Vec<Doc> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(kube_dir())
        .expect("deploy/kubernetes exists")
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| {
            matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            )
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no YAML files in deploy/kubernetes");
    let mut docs = Vec::new();
    for path in files {
        let file = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("UTF-8 file name")
            .to_owned();
        let text = std::fs::read_to_string(&path).expect("read manifest");
        for document in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{file}: invalid YAML: {e}"));
            if !value.is_null() {
                docs.push(Doc {
                    file: file.clone(),
                    value,
                });
            }
        }
    }
    docs
}

/// The only document of `kind` (panics when there is none or more than one).
fn one<'a>(docs: &'a [Doc], kind: &str) -> &'a Doc {
    let found: Vec<&Doc> = docs.iter().filter(|d| d.kind() == kind).collect();
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {kind} in deploy/kubernetes, found {}",
        found.len()
    );
    found[0]
}

/// The value at a dotted path of mapping keys (`spec.template.spec`).
fn at<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(value, |v, key| v.get(key))
}

fn req<'a>(value: &'a Value, path: &str) -> &'a Value {
    at(value, path).unwrap_or_else(|| panic!("missing {path}"))
}

fn str_at<'a>(value: &'a Value, path: &str) -> Option<&'a str> {
    at(value, path).and_then(Value::as_str)
}

fn seq<'a>(value: &'a Value, path: &str) -> &'a [Value] {
    at(value, path)
        .and_then(Value::as_sequence)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

/// A `matchLabels`/`selector`/`labels` mapping as string pairs.
fn labels(value: &Value, path: &str) -> BTreeMap<String, String> {
    let mapping = req(value, path)
        .as_mapping()
        .unwrap_or_else(|| panic!("{path} is not a mapping"));
    mapping
        .iter()
        .map(|(k, v)| {
            let k = k.as_str().expect("label key is a string");
            let v = v
                .as_str()
                .unwrap_or_else(|| panic!("label {k} must be a string"));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

/// `selector` is non-empty and every pair of it is a label of the pods.
fn assert_selects(
    what: &str,
    selector: &BTreeMap<String, String>,
    pods: &BTreeMap<String, String>,
) {
    assert!(!selector.is_empty(), "{what}: empty selector");
    for (k, v) in selector {
        assert_eq!(
            pods.get(k),
            Some(v),
            "{what}: selector {k}={v} does not match the Deployment's pod labels {pods:?}"
        );
    }
}

fn deployment(docs: &[Doc]) -> &Doc {
    one(docs, "Deployment")
}

/// The proxy's container: the one running the image's binary (the only one today).
fn proxy_container(deploy: &Doc) -> &Value {
    let containers = seq(&deploy.value, "spec.template.spec.containers");
    assert_eq!(
        containers.len(),
        1,
        "the Deployment runs one container, the proxy"
    );
    &containers[0]
}

fn pod_spec(deploy: &Doc) -> &Value {
    req(&deploy.value, "spec.template.spec")
}

fn pod_labels(deploy: &Doc) -> BTreeMap<String, String> {
    labels(&deploy.value, "spec.template.metadata.labels")
}

/// A probe's or Service's port (a number or a container port name) as a container port number.
fn resolve_port(container: &Value, port: &Value) -> u16 {
    let ports = seq(container, "ports");
    let number = if let Some(name) = port.as_str() {
        ports
            .iter()
            .find(|p| str_at(p, "name") == Some(name))
            .and_then(|p| at(p, "containerPort"))
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("no container port named {name:?}"))
    } else {
        let number = port.as_u64().expect("port is a number or a name");
        assert!(
            ports
                .iter()
                .any(|p| at(p, "containerPort").and_then(Value::as_u64) == Some(number)),
            "port {number} is not a container port"
        );
        number
    };
    u16::try_from(number).expect("port fits u16")
}

fn container_port_named(container: &Value, name: &str) -> u16 {
    resolve_port(container, &Value::String(name.to_owned()))
}

/// The ConfigMap's proxy.toml text and the ConfigMap's name.
fn configmap_proxy_toml(docs: &[Doc]) -> (&str, &str) {
    let cm = one(docs, "ConfigMap");
    // "proxy.toml" holds a dot, so it is looked up directly rather than through `at`.
    let text = at(&cm.value, "data")
        .and_then(|data| data.get("proxy.toml"))
        .and_then(Value::as_str)
        .expect("the ConfigMap has data.\"proxy.toml\"");
    (cm.name(), text)
}

/// `${NAME}` references in a string.
fn env_references(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else { break };
        names.push(after[..end].to_owned());
        rest = &after[end + 1..];
    }
    names
}

/// A string that is exactly one `${NAME}` reference: the value itself lives in the environment.
fn is_whole_reference(text: &str) -> bool {
    text.strip_prefix("${")
        .and_then(|rest| rest.strip_suffix('}'))
        .is_some_and(|name| {
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        })
}

/// Every string value under `key` names anywhere in the table, with its dotted key path.
fn strings_named(
    table: &toml::Table,
    prefix: &str,
    pred: &dyn Fn(&str) -> bool,
    out: &mut Vec<(String, String)>,
) {
    for (key, value) in table {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match value {
            toml::Value::String(s) if pred(key) => out.push((path, s.clone())),
            toml::Value::Table(t) => strings_named(t, &path, pred, out),
            toml::Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    if let toml::Value::Table(t) = item {
                        strings_named(t, &format!("{path}[{i}]"), pred, out);
                    }
                }
            }
            _ => {}
        }
    }
}

/// Parses `text` as if deployed: every `*_file` path is replaced by a temporary file holding a
/// dummy secret, and every `${NAME}` by `dummy-NAME`.
fn parse_as_deployed(label: &str, text: &str) -> Config {
    let table: toml::Table = toml::from_str(text).expect("proxy.toml is valid TOML");
    let mut files = Vec::new();
    strings_named(&table, "", &|k| k.ends_with("_file"), &mut files);
    let dir = std::env::temp_dir().join(format!("scap-manifests-{}-{label}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut text = text.to_owned();
    for (i, (_, original)) in files.iter().enumerate() {
        let local = dir.join(format!("secret-{i}"));
        std::fs::write(&local, format!("dummy-secret-{i}\n")).expect("write secret file");
        let local = local.to_str().expect("UTF-8 temp path").replace('\\', "/");
        text = text.replace(&format!("\"{original}\""), &format!("\"{local}\""));
    }
    let parsed = Config::parse(&text, &dir.join("proxy.toml"), &|name| {
        Some(format!("dummy-{name}"))
    });
    let _ = std::fs::remove_dir_all(&dir);
    parsed.unwrap_or_else(|e| panic!("{label}: the configuration does not validate:\n{e}"))
}

/// Seconds of a preStop `sleep` action, if the container has one.
fn pre_stop_sleep(container: &Value) -> u64 {
    at(container, "lifecycle.preStop.sleep.seconds")
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

#[test]
fn every_manifest_is_a_named_resource_and_the_kustomization_lists_them() {
    let docs = manifests();
    for doc in &docs {
        assert!(
            str_at(&doc.value, "apiVersion").is_some() && !doc.kind().is_empty(),
            "{}: a document without apiVersion/kind",
            doc.file
        );
        if doc.kind() != "Kustomization" {
            assert!(!doc.name().is_empty(), "{}: no metadata.name", doc.file);
        }
    }
    let kustomization = one(&docs, "Kustomization");
    let listed: BTreeSet<&str> = seq(&kustomization.value, "resources")
        .iter()
        .map(|r| r.as_str().expect("resource is a path"))
        .collect();
    for resource in &listed {
        assert!(
            kube_dir().join(resource).is_file(),
            "kustomization.yaml lists {resource}, which does not exist"
        );
    }
    let files: BTreeSet<&str> = docs.iter().map(|d| d.file.as_str()).collect();
    for file in files {
        match file {
            "kustomization.yaml" => {}
            // An example with placeholders: applying it with the rest would overwrite the real
            // Secret on every `kubectl apply -k`.
            "secret.yaml" => assert!(
                !listed.contains(file),
                "secret.yaml holds placeholders and must not be applied by the kustomization"
            ),
            other => assert!(
                listed.contains(other),
                "{other} is not listed in kustomization.yaml"
            ),
        }
    }
}

#[test]
fn deployment_runs_replicas_with_probes_on_the_admin_listener() {
    let docs = manifests();
    let deploy = deployment(&docs);
    let replicas = at(&deploy.value, "spec.replicas")
        .and_then(Value::as_u64)
        .expect("spec.replicas is set");
    assert!(replicas >= 2, "replicas is {replicas}; run at least 2");
    assert_selects(
        "Deployment spec.selector",
        &labels(&deploy.value, "spec.selector.matchLabels"),
        &pod_labels(deploy),
    );

    let (_, text) = configmap_proxy_toml(&docs);
    let config = parse_as_deployed("configmap", text);
    let admin = config
        .admin
        .as_ref()
        .expect("the ConfigMap's proxy.toml has an [admin] listener for the probes");
    assert!(
        !admin.listen.ip().is_loopback(),
        "[admin] listen {} is loopback; the kubelet cannot reach it",
        admin.listen
    );
    assert!(
        !config.server.listen.ip().is_loopback(),
        "[server] listen {} is loopback; the Service cannot reach it",
        config.server.listen
    );

    let container = proxy_container(deploy);
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = req(container, &format!("{probe}.httpGet"));
        assert_eq!(str_at(get, "path"), Some(path), "{probe} path");
        let port = resolve_port(container, req(get, "port"));
        assert_eq!(
            port,
            admin.listen.port(),
            "{probe} must probe the admin listener's port"
        );
    }
    assert_eq!(
        container_port_named(container, "proxy"),
        config.server.listen.port(),
        "the container port named \"proxy\" is the proxy's listen port"
    );
    assert_eq!(
        container_port_named(container, "admin"),
        admin.listen.port(),
        "the container port named \"admin\" is the admin listen port"
    );
}

#[test]
fn termination_grace_covers_the_pre_stop_sleep_and_the_drain() {
    let docs = manifests();
    let deploy = deployment(&docs);
    let (_, text) = configmap_proxy_toml(&docs);

    // Read shutdown_grace from the text itself, and from the validated config (which applies
    // the default when the key is absent); they must agree.
    let table: toml::Table = toml::from_str(text).expect("proxy.toml is valid TOML");
    let config = parse_as_deployed("grace", text);
    let grace = config.server.shutdown_grace;
    if let Some(written) = table
        .get("server")
        .and_then(|s| s.get("shutdown_grace"))
        .and_then(toml::Value::as_str)
    {
        let parsed =
            sitecore_auth_proxy::config::parse_duration(written).expect("a valid duration");
        assert_eq!(parsed, grace);
    }

    let termination = at(pod_spec(deploy), "terminationGracePeriodSeconds")
        .and_then(Value::as_u64)
        .expect("terminationGracePeriodSeconds is set");
    let pre_stop = pre_stop_sleep(proxy_container(deploy));
    let needed = grace + Duration::from_secs(pre_stop);
    assert!(
        Duration::from_secs(termination) > needed,
        "terminationGracePeriodSeconds {termination} must exceed preStop sleep {pre_stop}s + \
         shutdown_grace {grace:?}, or the kubelet kills the proxy mid-drain"
    );
}

#[test]
fn deployment_sets_resources_and_a_restricted_security_context() {
    let docs = manifests();
    let deploy = deployment(&docs);
    let container = proxy_container(deploy);
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            let path = format!("resources.{kind}.{resource}");
            assert!(
                at(container, &path).is_some_and(|v| !v.is_null()),
                "container {path} is not set"
            );
        }
    }

    let pod = at(pod_spec(deploy), "securityContext");
    let ctx = req(container, "securityContext");
    // Container settings win over the pod's; either level satisfies these two.
    let either = |key: &str| {
        at(ctx, key)
            .or_else(|| pod.and_then(|p| at(p, key)))
            .unwrap_or_else(|| panic!("securityContext.{key} is not set"))
    };
    assert_eq!(either("runAsNonRoot").as_bool(), Some(true));
    let uid = either("runAsUser")
        .as_u64()
        .expect("runAsUser is a number (so runAsNonRoot can be verified)");
    assert_ne!(uid, 0, "runAsUser must not be root");
    assert_eq!(
        str_at(either("seccompProfile"), "type"),
        Some("RuntimeDefault")
    );
    assert_eq!(
        at(ctx, "readOnlyRootFilesystem").and_then(Value::as_bool),
        Some(true)
    );
    assert_eq!(
        at(ctx, "allowPrivilegeEscalation").and_then(Value::as_bool),
        Some(false)
    );
    assert!(
        seq(ctx, "capabilities.drop")
            .iter()
            .any(|c| c.as_str() == Some("ALL")),
        "capabilities.drop must contain ALL"
    );
    assert!(
        seq(ctx, "capabilities.add").is_empty(),
        "no capability is needed"
    );
}

#[test]
fn config_path_env_points_into_the_configmap_mount() {
    let docs = manifests();
    let deploy = deployment(&docs);
    let container = proxy_container(deploy);
    let (configmap, _) = configmap_proxy_toml(&docs);

    let volume = seq(pod_spec(deploy), "volumes")
        .iter()
        .find(|v| str_at(v, "configMap.name") == Some(configmap))
        .unwrap_or_else(|| panic!("no volume mounts the ConfigMap {configmap}"));
    let volume_name = str_at(volume, "name").expect("volume name");
    let mount = seq(container, "volumeMounts")
        .iter()
        .find(|m| str_at(m, "name") == Some(volume_name))
        .unwrap_or_else(|| panic!("volume {volume_name} is not mounted"));
    assert!(
        at(mount, "subPath").is_none(),
        "mount the whole ConfigMap directory: subPath mounts never see ConfigMap updates"
    );
    let mount_path = str_at(mount, "mountPath").expect("mountPath");
    let expected = format!("{}/proxy.toml", mount_path.trim_end_matches('/'));

    let env = seq(container, "env")
        .iter()
        .find(|e| str_at(e, "name") == Some("SITECORE_PROXY_CONFIG"))
        .expect("the container sets SITECORE_PROXY_CONFIG");
    assert_eq!(str_at(env, "value"), Some(expected.as_str()));
    if let Some(items) = at(volume, "configMap.items") {
        let items = items.as_sequence().expect("items is a list");
        assert!(
            items
                .iter()
                .any(|i| str_at(i, "path") == Some("proxy.toml")),
            "the ConfigMap volume's items must include proxy.toml"
        );
    }
}

#[test]
fn configmap_proxy_toml_holds_no_secret_and_validates() {
    let docs = manifests();
    let (_, text) = configmap_proxy_toml(&docs);
    let table: toml::Table = toml::from_str(text).expect("proxy.toml is valid TOML");

    // Secret-bearing keys: either a whole ${VAR} reference, or absent in favour of *_file.
    let mut secrets = Vec::new();
    strings_named(
        &table,
        "",
        &|k| matches!(k, "client_secret" | "value" | "key"),
        &mut secrets,
    );
    for (path, value) in &secrets {
        assert!(
            is_whole_reference(value),
            "{path} holds a literal value in the ConfigMap; use \"${{VAR}}\" or a *_file"
        );
    }
    let credentials = table
        .get("credentials")
        .and_then(toml::Value::as_table)
        .expect("[credentials.NAME] sections");
    for (name, credential) in credentials {
        let has = |key: &str| credential.get(key).is_some();
        let header = credential.get("type").and_then(toml::Value::as_str) == Some("header");
        let (secret, file) = if header {
            ("value", "value_file")
        } else {
            ("client_secret", "client_secret_file")
        };
        assert!(
            has(secret) || has(file),
            "credentials.{name} has neither {secret} nor {file}"
        );
    }
    let clients = table
        .get("clients")
        .and_then(toml::Value::as_array)
        .expect("[[clients]]: the proxy listens beyond loopback and needs inbound keys");
    assert!(!clients.is_empty());

    // Validates as deployed; the credentials are what the file says.
    let config = parse_as_deployed("secrets", text);
    assert!(!config.clients.is_empty());
    let prefixes: BTreeSet<&str> = config.routes.iter().map(|r| r.prefix.as_str()).collect();
    for prefix in [
        "/authoring",
        "/deploy",
        "/edge-admin",
        "/edge-token",
        "/stream/documents",
    ] {
        assert!(prefixes.contains(prefix), "no route {prefix}");
    }
    for route in &config.routes {
        assert_eq!(
            route.upstream.scheme_str(),
            Some("https"),
            "route {} must reach Sitecore over HTTPS",
            route.prefix
        );
        let host = route.upstream.host().unwrap_or("");
        assert!(
            host.ends_with(".sitecorecloud.io"),
            "route {} goes to {host}, not Sitecore",
            route.prefix
        );
    }
}

#[test]
fn the_deployment_provides_every_variable_and_file_the_config_names() {
    let docs = manifests();
    let deploy = deployment(&docs);
    let container = proxy_container(deploy);
    let (_, text) = configmap_proxy_toml(&docs);
    let table: toml::Table = toml::from_str(text).expect("proxy.toml is valid TOML");

    // Only the uncommented values count.
    let mut all = Vec::new();
    strings_named(&table, "", &|_| true, &mut all);
    let env: BTreeSet<&str> = seq(container, "env")
        .iter()
        .filter_map(|e| str_at(e, "name"))
        .collect();
    for (path, value) in &all {
        for name in env_references(value) {
            assert!(
                env.contains(name.as_str()),
                "{path} references ${{{name}}}, which the Deployment does not set"
            );
        }
    }

    // Every *_file lies in a mounted volume and, for Secret volumes with items, is one of them.
    let volumes = seq(pod_spec(deploy), "volumes");
    let mounts = seq(container, "volumeMounts");
    let mut files = Vec::new();
    strings_named(&table, "", &|k| k.ends_with("_file"), &mut files);
    assert!(!files.is_empty(), "the ConfigMap reads secrets from files");
    for (path, file) in &files {
        let mount = mounts
            .iter()
            .find(|m| {
                str_at(m, "mountPath")
                    .is_some_and(|dir| file.starts_with(&format!("{}/", dir.trim_end_matches('/'))))
            })
            .unwrap_or_else(|| panic!("{path} = {file:?} is not under any volumeMount"));
        let dir = str_at(mount, "mountPath").expect("mountPath");
        let relative = &file[dir.trim_end_matches('/').len() + 1..];
        let volume_name = str_at(mount, "name").expect("mount name");
        let volume = volumes
            .iter()
            .find(|v| str_at(v, "name") == Some(volume_name))
            .unwrap_or_else(|| panic!("no volume {volume_name}"));
        if let Some(items) = at(volume, "secret.items").and_then(Value::as_sequence) {
            assert!(
                items.iter().any(|i| str_at(i, "path") == Some(relative)),
                "{path} = {file:?}: the Secret volume {volume_name} does not project {relative}"
            );
        }
    }
}

#[test]
fn the_secret_is_an_example_and_is_what_the_deployment_references() {
    let docs = manifests();
    let deploy = deployment(&docs);
    let container = proxy_container(deploy);
    let secret = one(&docs, "Secret");
    let name = secret.name();
    let keys: BTreeSet<String> = ["stringData", "data"]
        .iter()
        .filter_map(|section| at(&secret.value, section).and_then(Value::as_mapping))
        .flat_map(|m| m.keys())
        .map(|k| k.as_str().expect("secret key").to_owned())
        .collect();
    assert!(!keys.is_empty(), "the example Secret has keys");
    if let Some(data) = at(&secret.value, "stringData").and_then(Value::as_mapping) {
        for (key, value) in data {
            let value = value.as_str().expect("stringData values are strings");
            assert!(
                value.contains("replace-me"),
                "secret.yaml {key:?} must be a placeholder, not a real value"
            );
        }
    }

    let mut referenced = 0;
    for env in seq(container, "env") {
        if let Some(reference) = at(env, "valueFrom.secretKeyRef") {
            if str_at(reference, "name") == Some(name) {
                let key = str_at(reference, "key").expect("secretKeyRef key");
                assert!(
                    keys.contains(key),
                    "secretKeyRef {key} is not in the Secret"
                );
                referenced += 1;
            }
        }
    }
    assert!(referenced > 0, "no environment variable comes from {name}");
    let client_id = seq(container, "env")
        .iter()
        .find(|e| str_at(e, "name") == Some("SITECORE_CLIENT_ID"))
        .expect("SITECORE_CLIENT_ID is set");
    assert_eq!(
        str_at(client_id, "valueFrom.secretKeyRef.name"),
        Some(name),
        "SITECORE_CLIENT_ID comes from the Secret"
    );

    let volume = seq(pod_spec(deploy), "volumes")
        .iter()
        .find(|v| str_at(v, "secret.secretName") == Some(name))
        .unwrap_or_else(|| panic!("no volume mounts the Secret {name}"));
    for item in seq(volume, "secret.items") {
        let key = str_at(item, "key").expect("item key");
        assert!(keys.contains(key), "volume item {key} is not in the Secret");
    }
    let volume_name = str_at(volume, "name").expect("volume name");
    let mount = seq(container, "volumeMounts")
        .iter()
        .find(|m| str_at(m, "name") == Some(volume_name))
        .expect("the Secret volume is mounted");
    assert_eq!(str_at(mount, "mountPath"), Some("/run/secrets/sitecore"));
    assert_eq!(at(mount, "readOnly").and_then(Value::as_bool), Some(true));
}

#[test]
fn service_pdb_and_hpa_target_the_deployment() {
    let docs = manifests();
    let deploy = deployment(&docs);
    let pods = pod_labels(deploy);
    let container = proxy_container(deploy);

    let service = one(&docs, "Service");
    assert_selects(
        "Service spec.selector",
        &labels(&service.value, "spec.selector"),
        &pods,
    );
    let ports = seq(&service.value, "spec.ports");
    let target = |name: &str| {
        let port = ports
            .iter()
            .find(|p| str_at(p, "name") == Some(name))
            .unwrap_or_else(|| panic!("the Service has no port named {name:?}"));
        let target = at(port, "targetPort")
            .or_else(|| at(port, "port"))
            .expect("port");
        resolve_port(container, target)
    };
    assert_eq!(target("proxy"), container_port_named(container, "proxy"));
    assert_eq!(target("admin"), container_port_named(container, "admin"));

    let pdb = one(&docs, "PodDisruptionBudget");
    assert_selects(
        "PodDisruptionBudget spec.selector",
        &labels(&pdb.value, "spec.selector.matchLabels"),
        &pods,
    );
    assert!(
        at(&pdb.value, "spec.minAvailable").is_some()
            || at(&pdb.value, "spec.maxUnavailable").is_some(),
        "the PodDisruptionBudget sets minAvailable or maxUnavailable"
    );

    let hpa = one(&docs, "HorizontalPodAutoscaler");
    assert_eq!(str_at(&hpa.value, "apiVersion"), Some("autoscaling/v2"));
    assert_eq!(
        str_at(&hpa.value, "spec.scaleTargetRef.kind"),
        Some("Deployment")
    );
    assert_eq!(
        str_at(&hpa.value, "spec.scaleTargetRef.name"),
        Some(deploy.name())
    );
    let min = at(&hpa.value, "spec.minReplicas")
        .and_then(Value::as_u64)
        .expect("minReplicas");
    let max = at(&hpa.value, "spec.maxReplicas")
        .and_then(Value::as_u64)
        .expect("maxReplicas");
    assert!(min >= 2, "minReplicas is {min}; keep at least 2");
    assert!(max >= min);
    assert!(
        seq(&hpa.value, "spec.metrics")
            .iter()
            .any(|m| str_at(m, "resource.name") == Some("cpu")),
        "the HPA scales on CPU"
    );
}

/// Dockerfile instructions: comments dropped, `\` continuations joined, keyword uppercased.
fn dockerfile() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).expect("Dockerfile exists");
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (keyword, rest) = current
            .split_once(char::is_whitespace)
            .unwrap_or((&current, ""));
        out.push((keyword.to_ascii_uppercase(), rest.trim().to_owned()));
        current.clear();
    }
    out
}

/// Arguments of an exec-form (`["a", "b"]`) instruction.
fn exec_form(args: &str) -> Vec<String> {
    serde_json::from_str(args).unwrap_or_else(|e| panic!("not exec form: {args}: {e}"))
}

#[test]
fn dockerfile_builds_in_stages_and_runs_as_non_root_with_a_health_check() {
    let instructions = dockerfile();
    let all = |keyword: &str| -> Vec<&str> {
        instructions
            .iter()
            .filter(|(k, _)| k == keyword)
            .map(|(_, rest)| rest.as_str())
            .collect()
    };

    assert!(
        all("FROM").len() >= 2,
        "a multi-stage build: a builder and a runtime stage"
    );
    let user = *all("USER").last().expect("a USER instruction");
    let uid = user.split(':').next().unwrap_or("");
    assert!(
        !matches!(uid, "root" | "0" | ""),
        "USER {user} must not be root"
    );
    assert!(
        uid.bytes().all(|b| b.is_ascii_digit()),
        "USER {user} must be numeric so Kubernetes can verify runAsNonRoot"
    );
    let deploy_docs = manifests();
    let uid_in_k8s = at(
        req(proxy_container(deployment(&deploy_docs)), "securityContext"),
        "runAsUser",
    )
    .and_then(Value::as_u64)
    .map(|u| u.to_string());
    assert_eq!(
        uid_in_k8s.as_deref(),
        Some(uid),
        "the image's USER is the pod's runAsUser"
    );

    let exposed: BTreeSet<&str> = all("EXPOSE")
        .iter()
        .flat_map(|e| e.split_whitespace())
        .map(|p| p.trim_end_matches("/tcp"))
        .collect();
    assert!(
        exposed.contains("8080") && exposed.contains("9090"),
        "EXPOSE 8080 9090"
    );

    let healthcheck = *all("HEALTHCHECK").last().expect("a HEALTHCHECK");
    let command = healthcheck
        .split_once("CMD")
        .map(|(_, cmd)| exec_form(cmd.trim()))
        .expect("HEALTHCHECK ... CMD [...]");
    assert!(
        command.iter().any(|a| a == "healthcheck"),
        "the health check runs `sitecore-auth-proxy healthcheck`"
    );

    let entrypoint = exec_form(all("ENTRYPOINT").last().expect("an ENTRYPOINT"));
    assert_eq!(
        command[0], entrypoint[0],
        "HEALTHCHECK runs the same binary"
    );
    assert!(entrypoint[0].ends_with("/sitecore-auth-proxy"));
    assert!(
        all("COPY")
            .iter()
            .any(|c| c.starts_with("--from=") && c.ends_with(&entrypoint[0])),
        "the runtime stage copies the binary to {}",
        entrypoint[0]
    );
    assert_eq!(exec_form(all("CMD").last().expect("a CMD")), ["run"]);

    // The baked configuration: where SITECORE_PROXY_CONFIG points, reachable through the
    // exposed ports, with the admin port the HEALTHCHECK probes.
    let env = all("ENV").join(" ");
    let config_path = env
        .split_whitespace()
        .find_map(|pair| pair.strip_prefix("SITECORE_PROXY_CONFIG="))
        .expect("ENV SITECORE_PROXY_CONFIG=...");
    let copy = all("COPY")
        .into_iter()
        .find(|c| !c.starts_with("--from=") && c.ends_with(config_path))
        .unwrap_or_else(|| panic!("no COPY puts a configuration at {config_path}"));
    let source = copy.split_whitespace().next().expect("COPY source");
    let baked = std::fs::read_to_string(repo().join(source)).expect("the baked config exists");
    let config = parse_as_deployed("docker", &baked);
    assert!(
        !config.server.listen.ip().is_loopback(),
        "the baked config listens beyond loopback"
    );
    assert!(exposed.contains(config.server.listen.port().to_string().as_str()));
    let admin = config
        .admin
        .expect("the baked config has an [admin] listener");
    assert!(!admin.listen.ip().is_loopback());
    assert!(exposed.contains(admin.listen.port().to_string().as_str()));
    let url = command
        .iter()
        .skip_while(|a| *a != "--admin")
        .nth(1)
        .map_or("http://127.0.0.1:9090", String::as_str);
    assert!(
        url.ends_with(&format!(":{}", admin.listen.port())),
        "HEALTHCHECK probes {url}, but the admin listener is {}",
        admin.listen
    );
}

#[test]
fn dockerfile_dependency_stubs_match_the_cargo_targets() {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).expect("Dockerfile exists");
    let manifest: toml::Table =
        toml::from_str(&std::fs::read_to_string(repo().join("Cargo.toml")).expect("Cargo.toml"))
            .expect("Cargo.toml is TOML");
    for stub in ["src/main.rs", "src/lib.rs"] {
        assert!(text.contains(stub), "the dependency layer stubs {stub}");
    }
    for bench in manifest
        .get("bench")
        .and_then(toml::Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
    {
        let name = bench
            .get("name")
            .and_then(toml::Value::as_str)
            .expect("bench name");
        let path = format!("benches/{name}.rs");
        assert!(
            text.contains(&path),
            "Cargo.toml declares the bench {name}; the Dockerfile's dependency layer must stub {path}"
        );
    }
    if Path::new(&repo().join("build.rs")).exists() {
        assert!(
            text.contains("build.rs"),
            "the Dockerfile must copy build.rs"
        );
    }
    assert!(text.contains("--locked"), "builds use Cargo.lock as it is");

    let ignore =
        std::fs::read_to_string(repo().join(".dockerignore")).expect(".dockerignore exists");
    let ignored: BTreeSet<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for entry in ["target/", ".git/", "benches/load/results/"] {
        assert!(
            ignored.contains(entry),
            ".dockerignore must exclude {entry}"
        );
    }
}
