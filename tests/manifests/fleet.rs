//! `deploy/kubernetes/fleet/` (`kubectl apply -k deploy/kubernetes/fleet`) runs the proxy as a
//! fleet that shares state in Valkey, and agrees with the base (`deploy/kubernetes/base/`) and
//! with the proxy: the patched proxy.toml is the base's plus a `[cluster]` whose `redis_url` names the Valkey
//! Service and takes its password from a Secret through the environment, the replicas, budget
//! and autoscaler fit a fleet, Valkey keeps nothing on disk and requires that password, and no
//! secret value is written into a manifest.
//!
//! The overlay is rendered here by a small model of `kubectl kustomize` (resources, strategic
//! merge patches, images, namespace: what the files use, and nothing else is accepted). When
//! `kubectl` is installed, one test compares that model with the real rendering.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_yaml_ng::Value;

use super::{
    assert_selects, at, configmap_proxy_toml, deployment, env_references, is_whole_reference,
    kube_dir, labels, manifests, parse_as_deployed, pod_labels, pod_spec, proxy_container, req,
    resolve_port, seq, str_at, strings_named, Doc,
};

/// The example Secret of the fleet: placeholders, never applied by the kustomization.
const SECRET_EXAMPLE: &str = "valkey-secret.yaml";

/// The kustomization fields `build` models; any other would make its rendering silently wrong.
const KUSTOMIZATION_FIELDS: [&str; 6] = [
    "apiVersion",
    "kind",
    "namespace",
    "resources",
    "patches",
    "images",
];

/// Lists that a strategic merge patch merges by `name` (Kubernetes' patch merge key for these);
/// every other list in a patch replaces the target's.
const MERGED_BY_NAME: [&str; 4] = ["containers", "initContainers", "env", "volumes"];

fn fleet_dir() -> PathBuf {
    super::repo()
        .join("deploy")
        .join("kubernetes")
        .join("fleet")
}

/// `path` relative to deploy/kubernetes/fleet, for messages.
fn shown(path: &Path) -> String {
    path.strip_prefix(fleet_dir())
        .unwrap_or(path)
        .to_string_lossy()
        .replace('\\', "/")
}

/// Every non-empty YAML document of a file.
fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|document| {
            Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{}: invalid YAML: {e}", shown(path)))
        })
        .filter(|value| !value.is_null())
        .collect()
}

/// The `.yaml`/`.yml` files directly in `dir`, by name.
fn yaml_files(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| {
            path.is_file()
                && matches!(
                    path.extension().and_then(|e| e.to_str()),
                    Some("yaml" | "yml")
                )
        })
        .map(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .expect("UTF-8 file name")
                .to_owned()
        })
        .collect()
}

fn kustomization(dir: &Path) -> Value {
    let mut docs = yaml_docs(&dir.join("kustomization.yaml"));
    assert_eq!(
        docs.len(),
        1,
        "{}/kustomization.yaml: one document",
        shown(dir)
    );
    docs.remove(0)
}

fn strings(value: &Value, path: &str) -> Vec<String> {
    seq(value, path)
        .iter()
        .map(|v| {
            v.as_str()
                .unwrap_or_else(|| panic!("{path}: {v:?} is not a string"))
                .to_owned()
        })
        .collect()
}

/// Kubernetes' strategic merge of `patch` into `target`, for what patches here use: mappings
/// merge, `null` deletes a key, lists in [`MERGED_BY_NAME`] merge their items by `name`, and
/// anything else is replaced. (Kustomize puts new list items first; order is not compared.)
fn merge(target: &mut Value, patch: &Value, key: &str) {
    match (target, patch) {
        (Value::Mapping(target), Value::Mapping(patch)) => {
            for (k, v) in patch {
                let name = k.as_str().unwrap_or("");
                if v.is_null() {
                    target.remove(k);
                } else if let Some(existing) = target.get_mut(k) {
                    merge(existing, v, name);
                } else {
                    target.insert(k.clone(), v.clone());
                }
            }
        }
        (Value::Sequence(target), Value::Sequence(patch)) if MERGED_BY_NAME.contains(&key) => {
            for item in patch {
                let name = str_at(item, "name")
                    .unwrap_or_else(|| panic!("an item of {key} in a patch has no name"));
                match target.iter_mut().find(|i| str_at(i, "name") == Some(name)) {
                    Some(existing) => merge(existing, item, ""),
                    None => target.push(item.clone()),
                }
            }
        }
        (target, patch) => *target = patch.clone(),
    }
}

/// `images:` of a kustomization: containers whose image name matches get the new name and tag.
fn set_images(docs: &mut [Doc], images: &[Value]) {
    for image in images {
        let name = str_at(image, "name").expect("images[].name");
        for doc in docs.iter_mut() {
            for list in ["containers", "initContainers"] {
                let path = format!("spec.template.spec.{list}");
                let Some(Value::Sequence(containers)) = at_mut(&mut doc.value, &path) else {
                    continue;
                };
                for container in containers {
                    let Some(Value::String(current)) = container.get_mut("image") else {
                        continue;
                    };
                    let (current_name, tag) = current.split_once(':').unwrap_or((current, ""));
                    if current_name != name {
                        continue;
                    }
                    let new_name = str_at(image, "newName").unwrap_or(name);
                    let new_tag = str_at(image, "newTag").unwrap_or(tag);
                    *current = if new_tag.is_empty() {
                        new_name.to_owned()
                    } else {
                        format!("{new_name}:{new_tag}")
                    };
                }
            }
        }
    }
}

fn at_mut<'a>(value: &'a mut Value, path: &str) -> Option<&'a mut Value> {
    path.split('.').try_fold(value, |v, key| v.get_mut(key))
}

/// What `kubectl kustomize dir` renders, modelled for the fields in [`KUSTOMIZATION_FIELDS`]:
/// resources (files, and directories built recursively), strategic merge patches given by
/// `path`, images and namespace.
fn build(dir: &Path) -> Vec<Doc> {
    let k = kustomization(dir);
    let fields = k.as_mapping().expect("a kustomization is a mapping");
    for key in fields.keys() {
        let key = key.as_str().expect("kustomization keys are strings");
        assert!(
            KUSTOMIZATION_FIELDS.contains(&key),
            "{}/kustomization.yaml uses `{key}:`, which tests/manifests/fleet.rs does not \
             model; extend `build` there",
            shown(dir)
        );
    }
    let mut docs = Vec::new();
    for resource in strings(&k, "resources") {
        let path = dir.join(&resource);
        if path.is_dir() {
            docs.extend(build(&path));
        } else {
            assert!(
                path.is_file(),
                "{}/kustomization.yaml lists {resource}, which does not exist",
                shown(dir)
            );
            docs.extend(yaml_docs(&path).into_iter().map(|value| Doc {
                file: shown(&path),
                value,
            }));
        }
    }
    for patch in seq(&k, "patches") {
        let keys: Vec<&str> = patch
            .as_mapping()
            .expect("patches[] is a mapping")
            .keys()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(
            keys,
            ["path"],
            "patches[] here are strategic merge files given by `path` alone (the target is \
             the patch's own kind and name)"
        );
        let file = str_at(patch, "path").expect("patches[].path");
        for patch in yaml_docs(&dir.join(file)) {
            let kind = str_at(&patch, "kind").expect("a patch has a kind");
            let name = str_at(&patch, "metadata.name").expect("a patch has a metadata.name");
            let mut targets = docs
                .iter_mut()
                .filter(|d| d.kind() == kind && d.name() == name);
            let target = targets
                .next()
                .unwrap_or_else(|| panic!("{file} patches {kind} {name}, which the base lacks"));
            merge(&mut target.value, &patch, "");
            assert!(targets.next().is_none(), "{kind} {name} is defined twice");
        }
    }
    set_images(&mut docs, seq(&k, "images"));
    if let Some(namespace) = str_at(&k, "namespace") {
        for doc in docs.iter_mut().filter(|d| d.kind() != "Namespace") {
            if let Some(Value::Mapping(metadata)) = doc.value.get_mut("metadata") {
                metadata.insert("namespace".into(), namespace.into());
            }
        }
    }
    docs
}

/// The fleet as `kubectl apply -k deploy/kubernetes/fleet` would create it.
fn fleet() -> Vec<Doc> {
    build(&fleet_dir())
}

/// The only document of `kind` named `name`.
fn named<'a>(docs: &'a [Doc], kind: &str, name: &str) -> &'a Doc {
    let found: Vec<&Doc> = docs
        .iter()
        .filter(|d| d.kind() == kind && d.name() == name)
        .collect();
    assert_eq!(found.len(), 1, "expected one {kind} {name} in the fleet");
    found[0]
}

fn only<'a>(docs: &'a [Doc], kind: &str) -> &'a Doc {
    let found: Vec<&Doc> = docs.iter().filter(|d| d.kind() == kind).collect();
    assert_eq!(found.len(), 1, "expected one {kind} in the fleet");
    found[0]
}

/// The proxy's Deployment in the fleet: the one the base defines.
fn proxy_deployment(docs: &[Doc]) -> &Doc {
    let base = manifests();
    named(docs, "Deployment", deployment(&base).name())
}

/// True when every pair of `selector` is among `pods` (an empty selector selects nothing here).
fn selects(selector: &BTreeMap<String, String>, pods: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| pods.get(k) == Some(v))
}

/// How a container gets the environment variable `name`, panicking when it does not.
fn env_entry<'a>(container: &'a Value, name: &str) -> &'a Value {
    seq(container, "env")
        .iter()
        .find(|e| str_at(e, "name") == Some(name))
        .unwrap_or_else(|| panic!("the container does not set {name}"))
}

/// The (Secret name, key) an environment variable comes from, panicking when it is not a Secret.
fn secret_source(container: &Value, name: &str) -> (String, String) {
    let entry = env_entry(container, name);
    assert!(
        at(entry, "value").is_none(),
        "{name} is written into the manifest; take it from a Secret (valueFrom.secretKeyRef)"
    );
    let reference = at(entry, "valueFrom.secretKeyRef")
        .unwrap_or_else(|| panic!("{name} does not come from a Secret (valueFrom.secretKeyRef)"));
    (
        str_at(reference, "name")
            .expect("secretKeyRef.name")
            .to_owned(),
        str_at(reference, "key")
            .expect("secretKeyRef.key")
            .to_owned(),
    )
}

/// The argument after `flag` in a container's command line.
fn arg_after<'a>(args: &'a [Value], flag: &str) -> Option<&'a str> {
    args.iter().position(|a| a.as_str() == Some(flag)).map(|i| {
        args.get(i + 1)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("{flag} has no value"))
    })
}

/// `$(NAME)`, the kubelet's expansion of a container's environment variable in its arguments.
fn kubelet_reference(arg: &str) -> Option<&str> {
    arg.strip_prefix("$(")
        .and_then(|rest| rest.strip_suffix(')'))
        .filter(|name| {
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        })
}

/// Where `redis_url` points, and the environment variable its password comes from.
struct RedisUrl {
    host: String,
    port: u16,
    password_env: String,
}

/// The `[cluster]` of the fleet's proxy.toml, validated by the proxy's own parser.
fn cluster_url(docs: &[Doc], label: &str) -> RedisUrl {
    let (_, text) = configmap_proxy_toml(docs);
    let table: toml::Table = toml::from_str(text).expect("proxy.toml is valid TOML");
    let raw = table
        .get("cluster")
        .and_then(|c| c.get("redis_url"))
        .and_then(toml::Value::as_str)
        .expect("the fleet's proxy.toml has [cluster] redis_url (not redis_url_file)");
    let references = env_references(raw);
    assert_eq!(
        references.len(),
        1,
        "redis_url {raw:?} takes its password from one ${{VAR}}"
    );
    let password_env = references[0].clone();

    let config = parse_as_deployed(label, text);
    let cluster = config
        .cluster
        .as_ref()
        .expect("the fleet's proxy.toml has a [cluster] table");
    let url = reqwest::Url::parse(cluster.redis_url.expose()).expect("redis_url is a URL");
    assert_eq!(
        url.password(),
        Some(format!("dummy-{password_env}").as_str()),
        "the ${{{password_env}}} in redis_url {raw:?} must be exactly its password"
    );
    RedisUrl {
        host: url.host_str().expect("redis_url has a host").to_owned(),
        port: url.port().unwrap_or(6379),
        password_env,
    }
}

/// The Service `redis_url` names (by its name or `name.namespace.svc...`), and its Deployment.
fn valkey<'a>(docs: &'a [Doc], url: &RedisUrl) -> (&'a Doc, &'a Doc) {
    let service_name = url.host.split('.').next().unwrap_or("");
    let service = named(docs, "Service", service_name);
    let selector = labels(&service.value, "spec.selector");
    let deployments: Vec<&Doc> = docs
        .iter()
        .filter(|d| d.kind() == "Deployment" && selects(&selector, &pod_labels(d)))
        .collect();
    assert_eq!(
        deployments.len(),
        1,
        "the Service {service_name} selects the pods of exactly one Deployment"
    );
    (service, deployments[0])
}

/// The container of a single-container Deployment.
fn sole_container(deploy: &Doc) -> &Value {
    let containers = seq(&deploy.value, "spec.template.spec.containers");
    assert_eq!(containers.len(), 1, "{}: one container", deploy.name());
    &containers[0]
}

/// The "restricted" Pod Security Standard, which the namespace enforces, plus a read-only root.
fn assert_restricted(deploy: &Doc, container: &Value) {
    let what = deploy.name();
    let pod = at(pod_spec(deploy), "securityContext");
    let ctx = req(container, "securityContext");
    let either = |key: &str| {
        at(ctx, key)
            .or_else(|| pod.and_then(|p| at(p, key)))
            .unwrap_or_else(|| panic!("{what}: securityContext.{key} is not set"))
    };
    assert_eq!(either("runAsNonRoot").as_bool(), Some(true), "{what}");
    let uid = either("runAsUser").as_u64().expect("runAsUser is a number");
    assert_ne!(uid, 0, "{what}: runAsUser must not be root");
    assert_eq!(
        str_at(either("seccompProfile"), "type"),
        Some("RuntimeDefault"),
        "{what}"
    );
    for (key, value) in [
        ("readOnlyRootFilesystem", true),
        ("allowPrivilegeEscalation", false),
    ] {
        assert_eq!(
            at(ctx, key).and_then(Value::as_bool),
            Some(value),
            "{what}: {key}"
        );
    }
    assert!(
        seq(ctx, "capabilities.drop")
            .iter()
            .any(|c| c.as_str() == Some("ALL")),
        "{what}: capabilities.drop must contain ALL"
    );
    assert!(
        seq(ctx, "capabilities.add").is_empty(),
        "{what}: no capability"
    );
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                at(container, &format!("resources.{kind}.{resource}")).is_some(),
                "{what}: resources.{kind}.{resource} is not set"
            );
        }
    }
}

#[test]
fn the_fleet_kustomization_lists_the_base_and_every_file() {
    let k = kustomization(&fleet_dir());
    let resources = strings(&k, "resources");
    assert!(
        resources.iter().any(|r| r == "../base"),
        "the fleet builds on ../base (deploy/kubernetes/base/)"
    );
    let patches: Vec<String> = seq(&k, "patches")
        .iter()
        .map(|p| str_at(p, "path").expect("patches[].path").to_owned())
        .collect();
    let listed: BTreeSet<&str> = resources
        .iter()
        .chain(&patches)
        .map(String::as_str)
        .collect();
    for file in yaml_files(&fleet_dir()) {
        match file.as_str() {
            "kustomization.yaml" => {}
            // Placeholders: applying them would overwrite the real password on every apply.
            SECRET_EXAMPLE => assert!(
                !listed.contains(file.as_str()),
                "{SECRET_EXAMPLE} holds a placeholder and must not be applied"
            ),
            other => assert!(
                listed.contains(other),
                "fleet/{other} is not listed in fleet/kustomization.yaml"
            ),
        }
    }

    let docs = fleet();
    let mut seen = BTreeSet::new();
    for doc in &docs {
        assert!(
            seen.insert((doc.kind().to_owned(), doc.name().to_owned())),
            "{} {} is defined twice",
            doc.kind(),
            doc.name()
        );
        assert!(
            doc.kind() != "Secret",
            "{}: the fleet must not apply a Secret (real ones are created by hand)",
            doc.file
        );
        assert!(!doc.name().is_empty(), "{}: no metadata.name", doc.file);
    }
    let namespace = str_at(&k, "namespace").expect("the fleet sets its namespace");
    let base_namespace = str_at(&kustomization(&kube_dir()), "namespace").map(str::to_owned);
    assert_eq!(
        Some(namespace.to_owned()),
        base_namespace,
        "the fleet lives in the base's namespace"
    );
}

#[test]
fn the_fleet_proxy_toml_is_the_base_plus_a_cluster_table() {
    let docs = fleet();
    let (_, text) = configmap_proxy_toml(&docs);
    let table: toml::Table = toml::from_str(text).expect("proxy.toml is valid TOML");
    let mut without_cluster = table.clone();
    assert!(
        without_cluster.remove("cluster").is_some(),
        "the fleet's proxy.toml has a [cluster] table"
    );
    let base = manifests();
    let (_, base_text) = configmap_proxy_toml(&base);
    let base_table: toml::Table = toml::from_str(base_text).expect("base proxy.toml");
    assert_eq!(
        without_cluster, base_table,
        "fleet/configmap-patch.yaml's proxy.toml must be the base's (deploy/kubernetes/\
         configmap.yaml) plus [cluster]; copy the base's changes into it"
    );

    let config = parse_as_deployed("fleet-cluster", text);
    let cluster = config.cluster.expect("[cluster] validates");
    assert!(
        cluster.share_tokens,
        "the fleet shares tokens (hpa-patch.yaml's sizing relies on one token request per \
         credential per lifetime for the whole fleet)"
    );

    // Every ${NAME} of the file is set by the fleet's Deployment.
    let deploy = proxy_deployment(&docs);
    let container = proxy_container(deploy);
    let env: BTreeSet<&str> = seq(container, "env")
        .iter()
        .filter_map(|e| str_at(e, "name"))
        .collect();
    let mut all = Vec::new();
    strings_named(&table, "", &|_| true, &mut all);
    for (path, value) in &all {
        for name in env_references(value) {
            assert!(
                env.contains(name.as_str()),
                "{path} references ${{{name}}}, which the fleet's Deployment does not set"
            );
        }
    }
}

#[test]
fn redis_url_names_the_valkey_service_with_the_password_valkey_requires() {
    let docs = fleet();
    let url = cluster_url(&docs, "fleet-url");
    let (service, valkey_deploy) = valkey(&docs, &url);
    let valkey_container = sole_container(valkey_deploy);

    let port = seq(&service.value, "spec.ports")
        .iter()
        .find(|p| at(p, "port").and_then(Value::as_u64) == Some(u64::from(url.port)))
        .unwrap_or_else(|| {
            panic!(
                "redis_url names port {}, which the Service {} does not offer",
                url.port,
                service.name()
            )
        });
    let target = at(port, "targetPort").unwrap_or_else(|| req(port, "port"));
    let container_port = resolve_port(valkey_container, target);
    let args = seq(valkey_container, "args");
    let listens = arg_after(args, "--port").map_or(6379, |p| p.parse().expect("--port"));
    assert_eq!(
        container_port,
        listens,
        "the Service {} forwards to the port Valkey listens on",
        service.name()
    );

    // The proxy's password and Valkey's requirepass are the same Secret key.
    let proxy = secret_source(proxy_container(proxy_deployment(&docs)), &url.password_env);
    let requirepass =
        arg_after(args, "--requirepass").expect("Valkey requires a password (--requirepass)");
    let variable = kubelet_reference(requirepass).unwrap_or_else(|| {
        panic!("--requirepass {requirepass:?} must be $(VAR), set from a Secret, not a literal")
    });
    let valkey_secret = secret_source(valkey_container, variable);
    assert_eq!(
        proxy, valkey_secret,
        "${{{}}} in redis_url and Valkey's --requirepass come from the same Secret key",
        url.password_env
    );

    // The example Secret documents that key.
    let example = yaml_docs(&fleet_dir().join(SECRET_EXAMPLE));
    let (name, key) = &proxy;
    let secret = example
        .iter()
        .find(|d| str_at(d, "kind") == Some("Secret") && str_at(d, "metadata.name") == Some(name))
        .unwrap_or_else(|| panic!("{SECRET_EXAMPLE} does not show the Secret {name}"));
    let value = at(secret, "stringData")
        .and_then(|data| data.get(key.as_str()))
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{SECRET_EXAMPLE}: the Secret {name} has no key {key}"));
    assert!(
        value.contains("replace-me"),
        "{SECRET_EXAMPLE}: {key} must be a placeholder, not a real password"
    );
}

#[test]
fn the_fleet_runs_three_replicas_a_budget_of_two_and_scales_from_three() {
    let docs = fleet();
    let deploy = proxy_deployment(&docs);
    let pods = pod_labels(deploy);
    let replicas = at(&deploy.value, "spec.replicas")
        .and_then(Value::as_u64)
        .expect("spec.replicas");
    assert_eq!(replicas, 3, "the fleet starts with 3 replicas");

    let pdb = only(&docs, "PodDisruptionBudget");
    assert_selects(
        "PodDisruptionBudget spec.selector",
        &labels(&pdb.value, "spec.selector.matchLabels"),
        &pods,
    );
    let min_available = at(&pdb.value, "spec.minAvailable")
        .and_then(Value::as_u64)
        .expect("the budget sets minAvailable as a number");
    assert_eq!(min_available, 2);
    assert!(
        at(&pdb.value, "spec.maxUnavailable").is_none(),
        "a PodDisruptionBudget takes minAvailable or maxUnavailable, not both"
    );

    let hpa = only(&docs, "HorizontalPodAutoscaler");
    assert_eq!(str_at(&hpa.value, "apiVersion"), Some("autoscaling/v2"));
    assert_eq!(
        str_at(&hpa.value, "spec.scaleTargetRef.apiVersion"),
        Some("apps/v1")
    );
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
    assert!(min >= 3, "minReplicas is {min}; the fleet runs at least 3");
    assert!(
        max > min,
        "maxReplicas {max} leaves no room to scale from {min}"
    );
    assert!(
        (min..=max).contains(&replicas),
        "spec.replicas {replicas} is outside the HPA's {min}..={max}"
    );
    assert!(
        min_available < min,
        "minAvailable {min_available} must stay below minReplicas {min}, or no node can \
         ever be drained"
    );
}

#[test]
fn valkey_runs_without_persistence_and_requires_a_password_from_a_secret() {
    let docs = fleet();
    let url = cluster_url(&docs, "fleet-valkey");
    let (_, deploy) = valkey(&docs, &url);
    let container = sole_container(deploy);

    let image = str_at(container, "image").expect("image");
    let tag = image
        .rsplit_once(':')
        .map(|(_, tag)| tag)
        .filter(|tag| !tag.contains('/'))
        .unwrap_or_else(|| panic!("image {image} has no tag"));
    let version: Vec<&str> = tag.split('-').next().unwrap_or("").split('.').collect();
    assert!(
        version.len() >= 2 && version.iter().all(|p| p.parse::<u32>().is_ok()),
        "image {image}: pin a version (major.minor at least), not {tag:?}"
    );

    let args = seq(container, "args");
    assert_eq!(
        arg_after(args, "--save"),
        Some(""),
        "Valkey runs with --save \"\" (no snapshots)"
    );
    assert_eq!(
        arg_after(args, "--appendonly"),
        Some("no"),
        "Valkey runs with --appendonly no (no append-only file)"
    );
    let requirepass = arg_after(args, "--requirepass").expect("--requirepass");
    let variable = kubelet_reference(requirepass).expect("--requirepass $(VAR)");
    secret_source(container, variable);

    let pod = pod_spec(deploy);
    for volume in seq(pod, "volumes") {
        for persistent in ["persistentVolumeClaim", "hostPath", "ephemeral"] {
            assert!(
                at(volume, persistent).is_none(),
                "Valkey keeps nothing worth a {persistent} volume"
            );
        }
    }

    for probe in ["readinessProbe", "livenessProbe"] {
        let probe_value = req(container, probe);
        if let Some(socket) = at(probe_value, "tcpSocket") {
            let port = resolve_port(container, req(socket, "port"));
            assert_eq!(u64::from(port), u64::from(url.port), "{probe} port");
        } else if let Some(command) = at(probe_value, "exec.command") {
            let command: Vec<&str> = command
                .as_sequence()
                .expect("exec.command is a list")
                .iter()
                .filter_map(Value::as_str)
                .collect();
            let line = command.join(" ");
            // An unauthenticated PING answers NOAUTH, and valkey-cli exits 0 all the same.
            assert!(line.contains("ping"), "{probe} pings Valkey: {line}");
            assert!(
                line.contains(&format!("${variable}"))
                    || line.contains(&format!("${{{variable}}}")),
                "{probe} must authenticate with ${variable}: {line}"
            );
            assert!(line.contains("PONG"), "{probe} must check for PONG: {line}");
        } else {
            panic!("{probe} is neither tcpSocket nor an exec ping");
        }
    }
    assert_restricted(deploy, container);
    assert_restricted(
        proxy_deployment(&docs),
        proxy_container(proxy_deployment(&docs)),
    );
}

#[test]
fn valkey_is_apart_from_the_proxy_and_reachable_only_by_it() {
    let docs = fleet();
    let url = cluster_url(&docs, "fleet-apart");
    let (service, valkey_deploy) = valkey(&docs, &url);
    let valkey_pods = pod_labels(valkey_deploy);
    let proxy = proxy_deployment(&docs);
    let proxy_pods = pod_labels(proxy);
    assert_ne!(valkey_deploy.name(), proxy.name());

    // The proxy's selectors must not pick up the Valkey pods, nor Valkey's the proxy's.
    let proxy_service = named(&docs, "Service", proxy.name());
    let pdb = only(&docs, "PodDisruptionBudget");
    let mut proxy_selectors = vec![
        (
            "the proxy's Service".to_owned(),
            labels(&proxy_service.value, "spec.selector"),
        ),
        (
            "the PodDisruptionBudget".to_owned(),
            labels(&pdb.value, "spec.selector.matchLabels"),
        ),
        (
            "the proxy Deployment's selector".to_owned(),
            labels(&proxy.value, "spec.selector.matchLabels"),
        ),
    ];
    for (i, constraint) in seq(pod_spec(proxy), "topologySpreadConstraints")
        .iter()
        .enumerate()
    {
        proxy_selectors.push((
            format!("topologySpreadConstraints[{i}]"),
            labels(constraint, "labelSelector.matchLabels"),
        ));
    }
    for (what, selector) in &proxy_selectors {
        assert!(
            !selects(selector, &valkey_pods),
            "{what} ({selector:?}) also selects the Valkey pods {valkey_pods:?}"
        );
    }
    assert!(
        !selects(&labels(&service.value, "spec.selector"), &proxy_pods),
        "the Valkey Service selects the proxy's pods"
    );

    // Only the proxy's pods may connect, on Valkey's port.
    let policy = only(&docs, "NetworkPolicy");
    assert_selects(
        "NetworkPolicy spec.podSelector",
        &labels(&policy.value, "spec.podSelector.matchLabels"),
        &valkey_pods,
    );
    assert!(
        strings(&policy.value, "spec.policyTypes").contains(&"Ingress".to_owned()),
        "the NetworkPolicy restricts ingress"
    );
    let rules = seq(&policy.value, "spec.ingress");
    assert!(!rules.is_empty(), "the NetworkPolicy allows the proxy in");
    let valkey_container = sole_container(valkey_deploy);
    for rule in rules {
        let from = seq(rule, "from");
        assert!(
            !from.is_empty(),
            "an ingress rule without `from` admits everyone"
        );
        for peer in from {
            assert!(
                at(peer, "namespaceSelector").is_none() && at(peer, "ipBlock").is_none(),
                "Valkey admits only pods of its namespace"
            );
            assert_selects(
                "NetworkPolicy ingress from",
                &labels(peer, "podSelector.matchLabels"),
                &proxy_pods,
            );
        }
        for port in seq(rule, "ports") {
            assert_eq!(
                u64::from(resolve_port(valkey_container, req(port, "port"))),
                u64::from(url.port),
                "the NetworkPolicy opens Valkey's port"
            );
        }
    }
}

/// Environment variable names that hold secrets by their name.
fn sounds_secret(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    ["PASSWORD", "SECRET", "KEY", "TOKEN", "AUTH"]
        .iter()
        .any(|word| upper.contains(word))
}

/// Every string in a YAML value.
fn all_strings<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
    match value {
        Value::String(s) => out.push(s),
        Value::Sequence(items) => items.iter().for_each(|v| all_strings(v, out)),
        Value::Mapping(mapping) => mapping.values().for_each(|v| all_strings(v, out)),
        Value::Tagged(tagged) => all_strings(&tagged.value, out),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

#[test]
fn no_secret_value_is_written_into_a_manifest() {
    let docs = fleet();

    // Secret-bearing environment variables come from Secrets.
    for doc in docs.iter().filter(|d| d.kind() == "Deployment") {
        for container in seq(pod_spec(doc), "containers") {
            for entry in seq(container, "env") {
                let name = str_at(entry, "name").expect("env name");
                if sounds_secret(name) {
                    secret_source(container, name);
                }
            }
            // Passwords on a command line are references the kubelet expands.
            let args = seq(container, "args");
            for flag in ["--requirepass", "--masterauth", "-a", "--pass"] {
                if let Some(value) = arg_after(args, flag) {
                    assert!(
                        kubelet_reference(value).is_some(),
                        "{}: {flag} {value:?} must be $(VAR) from a Secret",
                        doc.name()
                    );
                }
            }
        }
    }

    // The proxy.toml's secrets are ${VAR} references or files; redis_url's password too.
    let (_, text) = configmap_proxy_toml(&docs);
    let table: toml::Table = toml::from_str(text).expect("proxy.toml is valid TOML");
    let mut secrets = Vec::new();
    strings_named(
        &table,
        "",
        &|k| matches!(k, "client_secret" | "value" | "key"),
        &mut secrets,
    );
    for (path, value) in &secrets {
        assert!(is_whole_reference(value), "{path} holds a literal value");
    }
    cluster_url(&docs, "fleet-secrets");

    // No value of the example Secrets is copied anywhere else.
    let mut examples: Vec<String> = Vec::new();
    for path in [
        kube_dir().join("secret.yaml"),
        fleet_dir().join(SECRET_EXAMPLE),
    ] {
        for secret in yaml_docs(&path) {
            if let Some(data) = at(&secret, "stringData").and_then(Value::as_mapping) {
                examples.extend(data.values().filter_map(Value::as_str).map(str::to_owned));
            }
        }
    }
    assert!(!examples.is_empty(), "the example Secrets have values");
    for doc in &docs {
        let mut found = Vec::new();
        all_strings(&doc.value, &mut found);
        for text in found {
            for example in &examples {
                assert!(
                    !text.contains(example.as_str()),
                    "{}: {} {} holds {example:?}, a value of an example Secret",
                    doc.file,
                    doc.kind(),
                    doc.name()
                );
            }
        }
    }
}

/// Lists merged by name, sorted by name (Kustomize and this model order new items differently).
fn canonical(value: &mut Value, key: &str) {
    match value {
        Value::Mapping(mapping) => {
            for (k, v) in mapping.iter_mut() {
                let name = k.as_str().unwrap_or("").to_owned();
                canonical(v, &name);
            }
        }
        Value::Sequence(items) => {
            for item in items.iter_mut() {
                canonical(item, "");
            }
            if MERGED_BY_NAME.contains(&key) {
                items.sort_by(|a, b| str_at(a, "name").cmp(&str_at(b, "name")));
            }
        }
        _ => {}
    }
}

fn kubectl() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("kubectl"))
            .find(|candidate| candidate.is_file())
    })
}

#[test]
fn kubectl_renders_the_fleet_as_these_tests_read_it() {
    let Some(kubectl) = kubectl() else {
        eprintln!(
            "note: kubectl is not installed; the fleet is checked through this file's model \
             of kustomize only"
        );
        return;
    };
    let output = Command::new(kubectl)
        .arg("kustomize")
        .arg(fleet_dir())
        .output()
        .expect("kubectl runs");
    assert!(
        output.status.success(),
        "kubectl kustomize deploy/kubernetes/fleet:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).expect("UTF-8 output");
    let mut rendered: BTreeMap<(String, String), Value> = BTreeMap::new();
    for document in serde_yaml_ng::Deserializer::from_str(&text) {
        let mut value = Value::deserialize(document).expect("kubectl renders YAML");
        if value.is_null() {
            continue;
        }
        canonical(&mut value, "");
        let kind = str_at(&value, "kind").unwrap_or("").to_owned();
        let name = str_at(&value, "metadata.name").unwrap_or("").to_owned();
        rendered.insert((kind, name), value);
    }
    let mut modelled: BTreeMap<(String, String), Value> = BTreeMap::new();
    for mut doc in fleet() {
        canonical(&mut doc.value, "");
        modelled.insert((doc.kind().to_owned(), doc.name().to_owned()), doc.value);
    }
    assert_eq!(
        rendered.keys().collect::<Vec<_>>(),
        modelled.keys().collect::<Vec<_>>(),
        "kubectl renders other resources than the model"
    );
    for (key, value) in &rendered {
        assert_eq!(
            value, &modelled[key],
            "{} {}: kubectl's rendering differs from the model in tests/manifests/fleet.rs",
            key.0, key.1
        );
    }
}
