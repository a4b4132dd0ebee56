//! deploy/k8s rendered by the real kustomize, and its wiring checked.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use serde::Deserialize;
use serde_json::Value;
use swiftbrush_proto::JobConfig;

use super::slurm::slurm_signal_seconds;
use super::{IMAGE_UID, read, root};

/// The rendered overlay: every object, by kind and name.
struct Rendered {
    objects: Vec<Value>,
}

impl Rendered {
    fn of_kind(&self, kind: &str) -> Vec<&Value> {
        self.objects.iter().filter(|o| o["kind"] == kind).collect()
    }

    fn one(&self, kind: &str, name: &str) -> &Value {
        let found: Vec<&Value> = self
            .of_kind(kind)
            .into_iter()
            .filter(|o| o["metadata"]["name"] == name)
            .collect();
        assert_eq!(found.len(), 1, "one {kind} {name}");
        found[0]
    }

    fn names(&self, kind: &str) -> BTreeSet<String> {
        self.of_kind(kind)
            .iter()
            .filter_map(|o| o["metadata"]["name"].as_str().map(str::to_owned))
            .collect()
    }
}

/// The real kustomize: standalone, or the one inside kubectl.
fn kustomize(dir: &Path) -> String {
    let tries: [(&str, &[&str]); 2] = [("kustomize", &["build"]), ("kubectl", &["kustomize"])];
    for (program, args) in tries {
        match Command::new(program).args(args).arg(dir).output() {
            Ok(out) if out.status.success() => {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            Ok(out) => panic!(
                "{program} {args:?} {} failed:\n{}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(_) => continue,
        }
    }
    panic!(
        "neither kustomize nor kubectl is installed: `apt-get install kubectl` (or any \
         kubectl >= 1.27, whose `kubectl kustomize` is kustomize v5)"
    );
}

/// deploy/k8s copied to a temporary folder with a job token written where
/// the example overlay expects it (the file is never committed), plus any
/// `extra` files.
fn render(overlay: &str, extra: &[(&str, &str)]) -> Rendered {
    let dir = tempfile::tempdir().expect("temp dir");
    copy_tree(&root().join("deploy/k8s"), &dir.path().join("k8s"));
    let example = dir.path().join("k8s/overlays/example");
    std::fs::write(
        example.join("job-token.txt"),
        "0123456789abcdef0123456789abcdef\n",
    )
    .expect("token");
    for (path, text) in extra {
        let path = dir.path().join("k8s").join(path);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, text).expect("write");
    }
    let yaml = kustomize(&dir.path().join("k8s").join(overlay));
    let objects = serde_norway::Deserializer::from_str(&yaml)
        .map(|doc| Value::deserialize(doc).expect("kustomize prints YAML"))
        .filter(|v| !v.is_null())
        .collect();
    Rendered { objects }
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from)
        .expect("read dir")
        .filter_map(Result::ok)
    {
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else if entry.file_name() != "job-token.txt" {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

fn pod_spec(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]
}

fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    pod_spec(workload)["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// `--flag=value` or `--flag value` in a container's args.
fn flag<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    let args: Vec<&str> = container["args"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let prefix = format!("--{name}=");
    args.iter().enumerate().find_map(|(i, a)| {
        a.strip_prefix(&prefix).or_else(|| {
            (*a == format!("--{name}"))
                .then(|| args.get(i + 1).copied())
                .flatten()
        })
    })
}

fn port_of(addr: &str) -> u64 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("no port in {addr}"))
}

/// A probe's or Service's port: a number, or a container port's name.
fn resolve_port(container: &Value, port: &Value) -> u64 {
    if let Some(n) = port.as_u64() {
        return n;
    }
    let name = port.as_str().expect("a port");
    container["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("no container port named {name}"))
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| &labels[k] == v))
}

/// The job config a ConfigMap carries, parsed and validated as the
/// coordinator does.
fn job_config(rendered: &Rendered, config_map: &str) -> JobConfig {
    let yaml = rendered.one("ConfigMap", config_map)["data"]["job.yaml"]
        .as_str()
        .expect("job.yaml in the job ConfigMap")
        .to_owned();
    let config = JobConfig::from_yaml_str(&yaml, "the job ConfigMap").expect("a job config");
    config.validate().expect("a valid job config");
    config
}

fn check_wiring(rendered: &Rendered) {
    let namespaced: Vec<&Value> = rendered
        .objects
        .iter()
        .filter(|o| o["kind"] != "Namespace")
        .collect();
    let namespace = rendered.of_kind("Namespace")[0]["metadata"]["name"].clone();
    for object in &namespaced {
        assert_eq!(
            object["metadata"]["namespace"], namespace,
            "{}",
            object["metadata"]["name"]
        );
    }
    let secrets = rendered.names("Secret");
    let config_maps = rendered.names("ConfigMap");
    let claims = rendered.names("PersistentVolumeClaim");

    let deployment = rendered.one("Deployment", "swiftbrush-coordinator");
    let job = rendered.one("Job", "swiftbrush-workers");
    assert_eq!(deployment["spec"]["replicas"], 1);
    assert_eq!(deployment["spec"]["strategy"]["type"], "Recreate");

    // Everything a pod mounts or reads exists (kustomize renamed the
    // generated ones with a hash; their references must follow).
    for workload in [deployment, job] {
        let spec = pod_spec(workload);
        for volume in spec["volumes"].as_array().expect("volumes") {
            if let Some(name) = volume["secret"]["secretName"].as_str() {
                assert!(
                    secrets.contains(name),
                    "Secret {name} is used but not defined: {secrets:?}"
                );
            }
            if let Some(name) = volume["configMap"]["name"].as_str() {
                assert!(
                    config_maps.contains(name),
                    "ConfigMap {name} is used but not defined"
                );
            }
            if let Some(name) = volume["persistentVolumeClaim"]["claimName"].as_str() {
                assert!(claims.contains(name), "PVC {name} is used but not defined");
            }
        }
        for c in spec["containers"].as_array().expect("containers") {
            let mounts: Vec<&str> = c["volumeMounts"]
                .as_array()
                .expect("mounts")
                .iter()
                .filter_map(|m| m["name"].as_str())
                .collect();
            let volumes: Vec<&str> = spec["volumes"]
                .as_array()
                .expect("volumes")
                .iter()
                .filter_map(|v| v["name"].as_str())
                .collect();
            assert!(
                mounts.iter().all(|m| volumes.contains(m)),
                "{mounts:?} vs {volumes:?}"
            );
            let mut defined: BTreeSet<String> = c["env"]
                .as_array()
                .map(|e| {
                    e.iter()
                        .filter_map(|v| v["name"].as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            for source in c["envFrom"].as_array().into_iter().flatten() {
                let optional = |r: &Value| r["optional"] == true;
                if let Some(name) = source["configMapRef"]["name"].as_str() {
                    assert!(
                        config_maps.contains(name),
                        "ConfigMap {name} (envFrom) is not defined"
                    );
                    let data = rendered.one("ConfigMap", name)["data"]
                        .as_object()
                        .expect("data");
                    defined.extend(data.keys().cloned());
                }
                if let Some(name) = source["secretRef"]["name"].as_str() {
                    assert!(
                        optional(&source["secretRef"]) || secrets.contains(name),
                        "Secret {name} (envFrom) is neither defined nor optional"
                    );
                }
            }
            // Every $(VAR) in the args is defined for the container.
            for arg in c["args"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                for var in arg
                    .split("$(")
                    .skip(1)
                    .filter_map(|s| s.split_once(')'))
                    .map(|(v, _)| v)
                {
                    assert!(
                        defined.contains(var),
                        "{arg}: $({var}) is not defined in the container"
                    );
                }
            }
            // The token: a file from the mounted Secret, never an env literal.
            assert!(
                !defined.contains("SWIFTBRUSH_TOKEN"),
                "the token is an env value"
            );
            let token_file = flag(c, "token-file").expect("--token-file");
            let token_mount = c["volumeMounts"]
                .as_array()
                .expect("mounts")
                .iter()
                .find(|m| token_file.starts_with(m["mountPath"].as_str().unwrap_or("-")))
                .unwrap_or_else(|| panic!("no volume holds {token_file}"));
            let volume = spec["volumes"]
                .as_array()
                .expect("volumes")
                .iter()
                .find(|v| v["name"] == token_mount["name"])
                .expect("the token volume");
            let item = &volume["secret"]["items"][0];
            assert_eq!(
                format!(
                    "{}/{}",
                    token_mount["mountPath"].as_str().expect("path"),
                    item["path"].as_str().expect("item")
                ),
                token_file
            );
            let secret = rendered.one(
                "Secret",
                volume["secret"]["secretName"].as_str().expect("name"),
            );
            assert!(
                secret["data"][item["key"].as_str().expect("key")].is_string(),
                "the Secret holds the token key"
            );
        }
        // Non-root, as the image's numeric USER.
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
        assert_eq!(spec["securityContext"]["runAsUser"], IMAGE_UID);
        assert!(
            labels_match(
                &workload["spec"]["selector"]["matchLabels"],
                &workload["spec"]["template"]["metadata"]["labels"]
            ) || workload["kind"] == "Job"
        );
    }

    // Ports: the coordinator's flags, its container ports, the probes, the Service.
    let coordinator = container(deployment, "coordinator");
    let grpc_port = port_of(flag(coordinator, "listen").expect("--listen"));
    let http_port = port_of(flag(coordinator, "http").expect("--http"));
    assert_eq!(
        resolve_port(coordinator, &"grpc".into()),
        grpc_port,
        "the container port grpc vs --listen"
    );
    assert_eq!(
        resolve_port(coordinator, &"http".into()),
        http_port,
        "the container port http vs --http"
    );
    let startup = &coordinator["startupProbe"]["grpc"];
    assert_eq!(
        startup["port"].as_u64(),
        Some(grpc_port),
        "the gRPC health probe's port"
    );
    assert_eq!(
        startup["service"],
        grpc_service_name(),
        "the health service name"
    );
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &coordinator[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(
            resolve_port(coordinator, &get["port"]),
            http_port,
            "{probe}"
        );
    }
    let service = rendered.one("Service", "swiftbrush-coordinator");
    assert!(labels_match(
        &service["spec"]["selector"],
        &deployment["spec"]["template"]["metadata"]["labels"]
    ));
    let service_port = |name: &str| {
        let port = service["spec"]["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("Service port {name}"));
        assert_eq!(
            resolve_port(coordinator, &port["targetPort"]),
            if name == "grpc" { grpc_port } else { http_port }
        );
        port["port"].as_u64().expect("port")
    };
    let service_grpc = service_port("grpc");
    service_port("http");

    // The workers reach that Service's gRPC port.
    let worker = container(job, "worker");
    let url = flag(worker, "coordinator").expect("--coordinator");
    assert_eq!(url, format!("http://swiftbrush-coordinator:{service_grpc}"));
    assert_eq!(service["metadata"]["name"], "swiftbrush-coordinator");

    // Workers: one pod per node, as many workers as GPUs, the world the job expects.
    let spec = &job["spec"];
    assert_eq!(spec["completionMode"], "Indexed");
    let num_nodes = spec["completions"].as_u64().expect("completions");
    assert_eq!(
        spec["parallelism"].as_u64(),
        Some(num_nodes),
        "parallelism = completions"
    );
    let gpus = worker["resources"]["limits"]["nvidia.com/gpu"]
        .as_u64()
        .expect("a GPU limit");
    assert!(gpus >= 1);
    if let Some(requested) = worker["resources"]["requests"]["nvidia.com/gpu"].as_u64() {
        assert_eq!(requested, gpus, "GPU request = limit");
    }
    let env = |name: &str| {
        worker["env"]
            .as_array()
            .expect("env")
            .iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str())
            .unwrap_or_else(|| panic!("worker env {name}"))
            .to_owned()
    };
    assert_eq!(
        env("SWIFTBRUSH_NUM_DEVICES"),
        gpus.to_string(),
        "one worker per GPU"
    );
    let health = env("SWIFTBRUSH_HEALTH_PORT")
        .parse::<u64>()
        .expect("a port");
    assert_eq!(
        resolve_port(worker, &worker["livenessProbe"]["httpGet"]["port"]),
        health
    );
    assert_eq!(worker["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(worker["command"][0], "swiftbrush-node");
    let job_cm = pod_spec(deployment)["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find_map(|v| v["configMap"]["name"].as_str())
        .expect("the job ConfigMap");
    let config = job_config(rendered, job_cm);
    let num_workers = num_nodes * gpus;
    assert_eq!(
        u64::from(config.world.max_size),
        num_workers,
        "world.max_size = nodes x GPUs"
    );
    assert!(u64::from(config.world.min_size) <= num_workers);
    assert_eq!(u64::from(config.train.global_batch) % num_workers, 0);
    let teacher = config.model.teacher.as_deref().expect("model.teacher");
    let mounts = worker["volumeMounts"].as_array().expect("mounts");
    assert!(
        mounts
            .iter()
            .any(|m| teacher.starts_with(m["mountPath"].as_str().unwrap_or("-"))),
        "the teacher {teacher} is on a volume the workers mount"
    );
    let pod = pod_spec(job);
    let anti =
        &pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0];
    assert_eq!(anti["topologyKey"], "kubernetes.io/hostname");
    assert!(labels_match(
        &anti["labelSelector"]["matchLabels"],
        &job["spec"]["template"]["metadata"]["labels"]
    ));
    let grace_s = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("a grace period");
    assert_eq!(
        grace_s,
        slurm_signal_seconds(),
        "the same checkpoint-then-exit budget as the Slurm script's --signal"
    );
    // The worker gives up on its checkpoint before Kubernetes kills it.
    let worker_grace_ms: u64 = flag(worker, "grace-ms")
        .expect("--grace-ms")
        .parse()
        .expect("ms");
    assert!(
        worker_grace_ms < grace_s * 1000,
        "--grace-ms {worker_grace_ms} vs {grace_s} s"
    );
    assert!(
        worker_grace_ms >= 60_000,
        "time for a step and a checkpoint"
    );
    let host = flag(worker, "host").expect("--host");
    assert_eq!(host, "$(NODE_NAME)", "failures are charged to the node");
    let node_name = worker["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == "NODE_NAME")
        .expect("NODE_NAME");
    assert_eq!(
        node_name["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );

    // PodDisruptionBudgets cover the pods they name.
    let pdbs = rendered.of_kind("PodDisruptionBudget");
    for workload in [deployment, job] {
        let labels = &workload["spec"]["template"]["metadata"]["labels"];
        assert!(
            pdbs.iter()
                .any(|p| labels_match(&p["spec"]["selector"]["matchLabels"], labels)),
            "a PodDisruptionBudget for {}",
            workload["metadata"]["name"]
        );
    }

    // Images: one registry and release for both; none floating.
    let worker_image = worker["image"].as_str().expect("image");
    let coordinator_image = coordinator["image"].as_str().expect("image");
    let (worker_name, worker_tag) = worker_image.rsplit_once(':').expect("a tagged image");
    let (coordinator_name, coordinator_tag) =
        coordinator_image.rsplit_once(':').expect("a tagged image");
    assert_eq!(worker_tag, coordinator_tag, "one release");
    assert_ne!(worker_tag, "latest");
    assert!(
        worker_name.ends_with("/swiftbrush") || worker_name == "swiftbrush",
        "{worker_image}"
    );
    assert_eq!(
        coordinator_name,
        format!("{worker_name}-coordinator"),
        "{coordinator_image}"
    );
}

/// `swiftbrush.v1.Coordinator`, from the proto file's package and service.
fn grpc_service_name() -> String {
    let proto = read("proto/proto/swiftbrush.proto");
    let package = proto
        .lines()
        .find_map(|l| l.strip_prefix("package "))
        .map(|p| p.trim_end_matches(';').trim())
        .expect("package");
    let service = proto
        .lines()
        .find_map(|l| l.strip_prefix("service "))
        .and_then(|s| s.split_whitespace().next())
        .expect("service");
    format!("{package}.{service}")
}

#[test]
fn the_example_overlay_renders_and_its_wiring_holds() {
    let rendered = render("overlays/example", &[]);
    check_wiring(&rendered);
    // The overlay's own values landed.
    let job = rendered.one("Job", "swiftbrush-workers");
    assert_eq!(
        container(job, "worker")["resources"]["limits"]["nvidia.com/gpu"],
        4
    );
    assert!(
        container(job, "worker")["image"]
            .as_str()
            .is_some_and(|i| i.starts_with("registry.example.com/"))
    );
    let settings = rendered
        .of_kind("ConfigMap")
        .into_iter()
        .find(|c| c["data"]["SWIFTBRUSH_STORE"].is_string())
        .expect("the settings ConfigMap");
    assert_eq!(
        settings["data"]["SWIFTBRUSH_STORE"],
        "s3://my-bucket/runs/sd21-base"
    );
    // The token came from the file, not from the repository.
    let secret = &rendered.of_kind("Secret")[0];
    assert_eq!(
        secret["data"]["token"],
        "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWYK"
    );
}

#[test]
fn the_shared_volume_component_puts_the_run_directory_on_one_volume_for_all() {
    // As the component's comment says: one line in the overlay.
    let example = read("deploy/k8s/overlays/example/kustomization.yaml");
    let overlay = format!("{example}\ncomponents:\n  - ../../components/shared-volume\n");
    let rendered = render(
        "overlays/example",
        &[("overlays/example/kustomization.yaml", &overlay)],
    );
    check_wiring(&rendered);
    let store = rendered
        .of_kind("ConfigMap")
        .into_iter()
        .find_map(|c| c["data"]["SWIFTBRUSH_STORE"].as_str().map(str::to_owned))
        .expect("the store setting");
    let claim = rendered.one("PersistentVolumeClaim", "swiftbrush-runs");
    assert_eq!(claim["spec"]["accessModes"][0], "ReadWriteMany");
    for (kind, name, container_name) in [
        ("Deployment", "swiftbrush-coordinator", "coordinator"),
        ("Job", "swiftbrush-workers", "worker"),
    ] {
        let workload = rendered.one(kind, name);
        let mounts = container(workload, container_name)["volumeMounts"]
            .as_array()
            .expect("mounts")
            .clone();
        assert!(
            mounts
                .iter()
                .any(|m| store.starts_with(m["mountPath"].as_str().unwrap_or("-"))),
            "{name} mounts the run directory {store}"
        );
    }
}

#[test]
fn the_base_alone_lacks_only_the_token_secret() {
    // Applying the base by mistake must not half-work: the one thing it
    // lacks is the Secret every pod needs, and the check names it.
    let rendered = render("base", &[]);
    assert!(rendered.of_kind("Secret").is_empty());
    let job = rendered.one("Job", "swiftbrush-workers");
    let volumes = pod_spec(job)["volumes"].as_array().expect("volumes");
    assert!(
        volumes
            .iter()
            .any(|v| v["secret"]["secretName"] == "swiftbrush-job-token")
    );
    // The base's own job config is valid and fits its workers.
    let job_cm = rendered
        .names("ConfigMap")
        .into_iter()
        .find(|n| n.starts_with("swiftbrush-job-"))
        .expect("the job ConfigMap");
    let config = job_config(&rendered, &job_cm);
    assert_eq!(config.world.max_size, 16, "2 nodes x 8 GPUs");
}
