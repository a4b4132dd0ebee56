//! The deployment files under deploy/ as a cluster would read them. The
//! image cannot be built here (no Docker engine), so the Dockerfile's
//! structure is checked: stages, pinned versions, the libtorch paths the
//! binary's rpath needs, USER, ENTRYPOINT, and that everything it copies
//! exists. The Kubernetes overlay is rendered by the real kustomize
//! (`kustomize` or `kubectl kustomize`) and its wiring checked: secrets and
//! config maps that pods use exist, ports agree between Service, probes and
//! the coordinator's flags, workers per pod agree with the GPUs and the
//! job's world size, images agree. The Slurm script's directives and its
//! refusals are checked here; tests/deploy_e2e.rs (with the worker) runs it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_json::Value;
use swiftbrush_proto::JobConfig;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn root() -> PathBuf {
    PathBuf::from(ROOT)
}

fn read(path: impl AsRef<Path>) -> String {
    let path = root().join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ---------------------------------------------------------------- Dockerfile

/// One instruction with its line continuations joined.
#[derive(Debug, Clone)]
struct Instruction {
    keyword: String,
    args: String,
}

#[derive(Debug)]
struct Stage {
    name: String,
    base: String,
    body: Vec<Instruction>,
}

struct Dockerfile {
    global_args: BTreeMap<String, String>,
    stages: Vec<Stage>,
}

impl Dockerfile {
    fn parse(text: &str) -> Self {
        let mut logical = Vec::new();
        let mut current = String::new();
        for line in text.lines() {
            let trimmed = line.trim();
            if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
                continue;
            }
            match trimmed.strip_suffix('\\') {
                Some(head) => {
                    current.push_str(head);
                    current.push(' ');
                }
                None => {
                    current.push_str(trimmed);
                    logical.push(std::mem::take(&mut current));
                }
            }
        }
        assert!(
            current.is_empty(),
            "the Dockerfile ends inside a continuation"
        );
        let mut global_args = BTreeMap::new();
        let mut stages: Vec<Stage> = Vec::new();
        for line in logical {
            let (keyword, args) = line.split_once(' ').unwrap_or((&line, ""));
            let instruction = Instruction {
                keyword: keyword.to_ascii_uppercase(),
                args: args.trim().to_owned(),
            };
            match (instruction.keyword.as_str(), stages.last_mut()) {
                ("FROM", _) => {
                    let words: Vec<&str> = instruction.args.split_whitespace().collect();
                    let name = match words.as_slice() {
                        [_, as_, name] if as_.eq_ignore_ascii_case("as") => (*name).to_owned(),
                        _ => panic!("every stage is named: FROM {}", instruction.args),
                    };
                    stages.push(Stage {
                        name,
                        base: words[0].to_owned(),
                        body: Vec::new(),
                    });
                }
                ("ARG", None) => {
                    let (k, v) = instruction.args.split_once('=').unwrap_or_else(|| {
                        panic!("a global ARG has a default: {}", instruction.args)
                    });
                    global_args.insert(k.to_owned(), v.to_owned());
                }
                (_, None) => panic!("{} before the first FROM", instruction.keyword),
                (_, Some(stage)) => stage.body.push(instruction),
            }
        }
        Self {
            global_args,
            stages,
        }
    }

    fn stage(&self, name: &str) -> &Stage {
        self.stages
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no stage {name}"))
    }

    /// A stage's base with ${ARG} replaced by the global default.
    fn base_image(&self, stage: &Stage) -> String {
        let mut image = stage.base.clone();
        for (k, v) in &self.global_args {
            image = image.replace(&format!("${{{k}}}"), v);
        }
        image
    }
}

impl Stage {
    fn all(&self, keyword: &str) -> Vec<&str> {
        self.body
            .iter()
            .filter(|i| i.keyword == keyword)
            .map(|i| i.args.as_str())
            .collect()
    }

    fn last(&self, keyword: &str) -> Option<&str> {
        self.all(keyword).last().copied()
    }

    /// ENV values set in this stage (KEY=VALUE forms).
    fn env(&self) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        for args in self.all("ENV") {
            for pair in args.split_whitespace() {
                if let Some((k, v)) = pair.split_once('=') {
                    env.insert(k.to_owned(), v.trim_matches('"').to_owned());
                }
            }
        }
        env
    }

    /// COPY instructions as (from stage, sources, destination).
    fn copies(&self) -> Vec<(Option<String>, Vec<String>, String)> {
        self.all("COPY")
            .into_iter()
            .map(|args| {
                let mut from = None;
                let mut paths = Vec::new();
                for word in args.split_whitespace() {
                    if let Some(stage) = word.strip_prefix("--from=") {
                        from = Some(stage.to_owned());
                    } else if !word.starts_with("--") {
                        paths.push(word.to_owned());
                    }
                }
                let destination = paths.pop().expect("a COPY destination");
                (from, paths, destination)
            })
            .collect()
    }
}

/// `name:1.2.3-x` -> the numeric version at the start of the tag.
fn image_version(image: &str) -> Vec<u32> {
    let tag = image
        .rsplit_once(':')
        .map(|(_, t)| t)
        .unwrap_or_else(|| panic!("{image} has no tag: pin a version"));
    tag.split(|c: char| !c.is_ascii_digit() && c != '.')
        .next()
        .unwrap_or_default()
        .split('.')
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn dockerfile() -> Dockerfile {
    Dockerfile::parse(&read("deploy/docker/Dockerfile"))
}

#[test]
fn the_dockerfile_has_its_stages_and_pins_its_base_images() {
    let docker = dockerfile();
    let names: Vec<&str> = docker.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "torch",
            "builder",
            "coordinator-builder",
            "coordinator",
            "worker"
        ],
        "the worker image is the last stage, so a plain `docker build` makes it"
    );
    for stage in &docker.stages {
        let image = docker.base_image(stage);
        if names.contains(&image.as_str()) {
            continue;
        }
        assert!(!image.contains("${"), "{}: unresolved {image}", stage.name);
        assert!(
            !image.ends_with(":latest"),
            "{}: {image} is not pinned",
            stage.name
        );
        assert!(
            image_version(&image).len() >= 2,
            "{}: {image} has no version in its tag",
            stage.name
        );
    }
    // The Rust image is at least the workspace's rust-version.
    let rust = docker.base_image(docker.stage("torch"));
    let cargo_toml: toml_like::Table = toml_like::parse(&read("Cargo.toml"));
    let needed: Vec<u32> = cargo_toml["rust-version"]
        .split('.')
        .map(|p| p.parse().expect("rust-version"))
        .collect();
    assert!(
        image_version(&rust) >= needed,
        "{rust} is older than rust-version {needed:?}"
    );

    // The CUDA base has the CUDA major version of the torch wheel's runtime.
    let cuda = docker.base_image(docker.stage("worker"));
    assert!(cuda.starts_with("nvidia/cuda:"), "{cuda}");
    let wheel_cuda = wheel_cuda_major();
    assert_eq!(
        image_version(&cuda)[0],
        wheel_cuda,
        "{cuda} vs the wheel's CUDA {wheel_cuda}"
    );
}

/// The major version of nvidia-cuda-runtime that the torch wheel in .venv
/// depends on (the image installs the same pinned wheel).
fn wheel_cuda_major() -> u32 {
    let lib = root().join(".venv/lib");
    let site = std::fs::read_dir(&lib)
        .unwrap_or_else(|e| panic!("{}: {e} (run `make venv`)", lib.display()))
        .filter_map(Result::ok)
        .map(|e| e.path().join("site-packages"))
        .find(|p| p.is_dir())
        .expect("a python site-packages in .venv");
    let runtime = std::fs::read_dir(&site)
        .expect("site-packages")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("nvidia_cuda_runtime") && n.ends_with(".dist-info"))
        .expect("the torch wheel's nvidia-cuda-runtime dependency");
    // nvidia_cuda_runtime-13.0.96.dist-info or nvidia_cuda_runtime_cu12-12.8.90.dist-info
    let version = runtime
        .split('-')
        .nth(1)
        .expect("a version in the dist-info name");
    version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .expect("a major version")
}

#[test]
fn the_dockerfile_builds_with_the_pinned_torch_and_keeps_libtorch_where_the_rpath_points() {
    let docker = dockerfile();
    let requirements = read("requirements-torch.txt");
    assert!(
        requirements.lines().any(|l| l.trim() == "torch==2.13.0"),
        "requirements-torch.txt pins torch==2.13.0 (tch 0.26)"
    );
    let torch = docker.stage("torch");
    let runs = torch.all("RUN").join("\n");
    assert!(runs.contains("-r /tmp/requirements-torch.txt"), "{runs}");
    let prefix = torch.env()["TORCH_PREFIX"].clone();
    assert!(runs.contains("--target \"$TORCH_PREFIX\""), "{runs}");

    let builder = docker.stage("builder");
    assert_eq!(builder.base, "torch");
    let libtorch = builder.env()["LIBTORCH"].clone();
    assert_eq!(libtorch, format!("{prefix}/torch"));
    let build = builder.all("RUN").join("\n");
    assert!(
        build.contains("cargo build --release --locked --bin swiftbrush"),
        "{build}"
    );

    // The binary looks for libtorch at exactly $LIBTORCH/lib (build.rs
    // takes the path literally, symlinks and all): the binary built here
    // shows it.
    let runpath = runpath(env!("CARGO_BIN_EXE_swiftbrush"));
    // .cargo/config.toml sets LIBTORCH for every build.
    let local = env!("LIBTORCH");
    assert_eq!(runpath, format!("{local}/lib"));
    // So the runtime stage puts torch/lib and the CUDA wheels (which
    // libtorch finds at ../../nvidia) at the builder's paths.
    let worker = docker.stage("worker");
    let copies = worker.copies();
    for dir in [format!("{libtorch}/lib"), format!("{prefix}/nvidia")] {
        assert!(
            copies
                .iter()
                .any(|(from, src, dst)| from.as_deref() == Some("torch")
                    && src == std::slice::from_ref(&dir)
                    && dst == &dir),
            "the worker stage copies {dir} to the same path: {copies:?}"
        );
    }
    assert!(
        copies
            .iter()
            .any(|(from, src, dst)| from.as_deref() == Some("builder")
                && src == &["/usr/local/bin/swiftbrush".to_owned()]
                && dst == "/usr/local/bin/swiftbrush")
    );
    let coordinator = docker.stage("coordinator-builder");
    let build = coordinator.all("RUN").join("\n");
    assert!(build.contains("-p swiftbrush-coordinator"), "{build}");
    assert!(
        !coordinator.env().contains_key("LIBTORCH"),
        "the coordinator needs no libtorch"
    );
}

fn runpath(binary: &str) -> String {
    let out = Command::new("readelf")
        .args(["-d", binary])
        .output()
        .expect("readelf (binutils) runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("(RUNPATH)") || l.contains("(RPATH)"))
        .unwrap_or_else(|| panic!("{binary} has no rpath:\n{text}"));
    line.split_once('[')
        .and_then(|(_, r)| r.strip_suffix(']'))
        .expect("readelf's [path]")
        .to_owned()
}

#[test]
fn the_images_run_as_a_numeric_non_root_user_with_an_exec_entrypoint_and_no_secrets() {
    let docker = dockerfile();
    for (stage, entrypoint) in [
        ("worker", r#"["swiftbrush"]"#),
        ("coordinator", r#"["swiftbrush-coordinator"]"#),
    ] {
        let stage = docker.stage(stage);
        let user = stage.last("USER").expect("a USER");
        assert_eq!(user, format!("{IMAGE_UID}:{IMAGE_UID}"), "{}", stage.name);
        assert_eq!(stage.last("ENTRYPOINT"), Some(entrypoint), "{}", stage.name);
        let runs = stage.all("RUN").join("\n");
        assert!(runs.contains(&format!("--uid {IMAGE_UID}")), "{runs}");
    }
    for stage in &docker.stages {
        for key in stage.env().keys().chain(docker.global_args.keys()) {
            let upper = key.to_ascii_uppercase();
            assert!(
                !["TOKEN", "SECRET", "PASSWORD", "ACCESS_KEY", "CREDENTIAL"]
                    .iter()
                    .any(|w| upper.contains(w)),
                "{}: {key} looks like a secret baked into the image",
                stage.name
            );
        }
    }
}

/// The user the images run as (and the pods' runAsUser).
const IMAGE_UID: u32 = 10001;

#[test]
fn every_path_the_dockerfile_copies_exists_and_reaches_the_build_context() {
    let docker = dockerfile();
    let ignore = read("deploy/docker/Dockerfile.dockerignore");
    let allowed: Vec<&str> = ignore
        .lines()
        .filter_map(|l| l.trim().strip_prefix('!'))
        .map(|p| p.trim_end_matches('/'))
        .collect();
    assert!(
        ignore.lines().any(|l| l.trim() == "*"),
        "the context starts empty"
    );
    let names: BTreeSet<&str> = docker.stages.iter().map(|s| s.name.as_str()).collect();
    let mut num_copied = 0;
    for (index, stage) in docker.stages.iter().enumerate() {
        for (from, sources, _) in stage.copies() {
            if let Some(from) = from {
                let earlier: Vec<&str> = docker.stages[..index]
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect();
                assert!(
                    names.contains(from.as_str()) && earlier.contains(&from.as_str()),
                    "{}: --from={from} is not an earlier stage",
                    stage.name
                );
                continue;
            }
            for source in sources {
                assert!(
                    root().join(&source).exists(),
                    "{}: COPY {source}: no such path",
                    stage.name
                );
                assert!(
                    allowed
                        .iter()
                        .any(|a| source == *a || source.starts_with(&format!("{a}/"))),
                    "{}: COPY {source} is excluded by Dockerfile.dockerignore",
                    stage.name
                );
                num_copied += 1;
            }
        }
    }
    assert!(num_copied >= 10, "{num_copied}");
    // The workspace members are all copied: cargo needs every manifest.
    let builder = docker.stage("builder");
    let copied: Vec<String> = builder
        .copies()
        .into_iter()
        .flat_map(|(_, s, _)| s)
        .collect();
    for member in [
        "proto",
        "coordinator",
        "worker",
        "src",
        "Cargo.lock",
        ".cargo",
    ] {
        assert!(
            copied.iter().any(|c| c == member),
            "builder copies {member}: {copied:?}"
        );
    }
}

/// Just enough of TOML for `rust-version = "1.88"` under [workspace.package].
mod toml_like {
    pub type Table = std::collections::BTreeMap<String, String>;

    pub fn parse(text: &str) -> Table {
        text.lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().trim_matches('"').to_owned()))
            .collect()
    }
}

// ---------------------------------------------------------------- Kubernetes

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

// --------------------------------------------------------------------- Slurm

fn sbatch_directives() -> Vec<String> {
    read("deploy/slurm/swiftbrush.sbatch")
        .lines()
        .filter_map(|l| l.strip_prefix("#SBATCH "))
        .map(|l| l.trim().to_owned())
        .collect()
}

/// N of `--signal=[B:]SIG@N`: how long before the end the workers are told.
fn slurm_signal_seconds() -> u64 {
    let signal = sbatch_directives()
        .into_iter()
        .find_map(|d| d.strip_prefix("--signal=").map(str::to_owned))
        .expect("an --signal directive");
    let (sig, seconds) = signal.split_once('@').expect("SIG@SECONDS");
    assert!(
        !sig.starts_with("B:"),
        "the signal must reach the workers (job steps), not only the batch shell"
    );
    assert!(
        matches!(sig, "TERM" | "USR1"),
        "{sig}: the workers' checkpoint path listens for TERM"
    );
    seconds.parse().expect("seconds")
}

#[test]
fn the_sbatch_script_requeues_signals_the_workers_and_parses() {
    let directives = sbatch_directives();
    assert!(
        directives.iter().any(|d| d == "--requeue"),
        "{directives:?}"
    );
    assert!(slurm_signal_seconds() >= 60, "time to write a checkpoint");
    let script = read("deploy/slurm/swiftbrush.sbatch");
    let grace_ms: u64 = script
        .split("SWIFTBRUSH_GRACE_MS:-")
        .nth(1)
        .and_then(|s| s.split('}').next())
        .and_then(|s| s.parse().ok())
        .expect("a default SWIFTBRUSH_GRACE_MS");
    assert!(
        grace_ms < slurm_signal_seconds() * 1000,
        "the workers give up before the time limit"
    );
    assert!(script.contains("--grace-ms \"$SWIFTBRUSH_GRACE_MS\""));
    assert!(directives.iter().any(|d| d.starts_with("--gpus-per-node=")));
    let script = read("deploy/slurm/swiftbrush.sbatch");
    for needle in [
        "scontrol show hostnames \"$SLURM_JOB_NODELIST\"",
        "SLURM_GPUS_ON_NODE",
        "SLURM_LOCALID",
        "scontrol requeue \"$SLURM_JOB_ID\"",
        "srun ",
    ] {
        assert!(script.contains(needle), "the script uses {needle}");
    }
    let syntax = Command::new("bash")
        .arg("-n")
        .arg(root().join("deploy/slurm/swiftbrush.sbatch"))
        .output()
        .expect("bash");
    assert!(
        syntax.status.success(),
        "{}",
        String::from_utf8_lossy(&syntax.stderr)
    );
}

#[test]
fn the_sbatch_script_names_what_is_missing() {
    let dir = tempfile::tempdir().expect("dir");
    let run = |env: &[(&str, &str)]| {
        let mut cmd = Command::new("bash");
        cmd.arg(root().join("deploy/slurm/swiftbrush.sbatch"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .current_dir(dir.path());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("bash");
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(run(&[]).contains("run this with sbatch"));
    let slurm = [("SLURM_JOB_ID", "7"), ("SLURM_JOB_NODELIST", "n1")];
    assert!(run(&slurm).contains("set SWIFTBRUSH_CONFIG"));
    let config = dir.path().join("job.yaml");
    std::fs::write(&config, "name: x\n").expect("config");
    let config = config.display().to_string();
    let with_config = [slurm[0], slurm[1], ("SWIFTBRUSH_CONFIG", config.as_str())];
    assert!(run(&with_config).contains("set SWIFTBRUSH_STORE"));
    let with_store = [
        with_config[0],
        with_config[1],
        with_config[2],
        ("SWIFTBRUSH_STORE", "/runs/x"),
    ];
    let no_token = run(&with_store);
    assert!(no_token.contains("SWIFTBRUSH_TOKEN_FILE"), "{no_token}");
}

// ------------------------------------------------------------ swiftbrush-node

/// A stand-in for `swiftbrush worker` (the script under test is the node
/// launcher): it records its arguments, answers SIGTERM by recording it and
/// exiting 0, and on port 9001 fails with 3 once the worker on 9000 runs.
const STAND_IN: &str = r#"#!/usr/bin/env bash
trap 'echo "term $*" >> "$NODE_LOG"; exit 0' TERM
echo "start $*" >> "$NODE_LOG"
if [[ "$*" == *":9001"* ]]; then
    until grep -q ':9000' "$NODE_LOG"; do sleep 0.01; done
    exit 3
fi
while :; do sleep 0.05; done
"#;

fn node_launcher(dir: &Path, env: &[(&str, &str)]) -> std::process::Child {
    let stand_in = dir.join("swiftbrush");
    std::fs::write(&stand_in, STAND_IN).expect("stand-in");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&stand_in, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let mut cmd = Command::new(root().join("deploy/docker/swiftbrush-node"));
    cmd.args(["--coordinator", "http://c:50051"])
        .env("SWIFTBRUSH_BIN", &stand_in)
        .env("NODE_LOG", dir.join("log"))
        .env("SWIFTBRUSH_DEVICE_KIND", "cpu")
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("swiftbrush-node")
}

fn node_log(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn wait_for(child: &mut std::process::Child) -> i32 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status.code().expect("an exit code");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "swiftbrush-node did not exit"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn swiftbrush_node_starts_a_worker_per_device_and_forwards_sigterm() {
    let dir = tempfile::tempdir().expect("dir");
    let mut node = node_launcher(
        dir.path(),
        &[
            ("SWIFTBRUSH_NUM_DEVICES", "2"),
            ("SWIFTBRUSH_HEALTH_PORT", "8080"),
        ],
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while node_log(dir.path()).len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the workers did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let started = node_log(dir.path());
    for port in [8080, 8081] {
        let expected = format!(
            "start worker --device cpu --health-listen 0.0.0.0:{port} --coordinator http://c:50051"
        );
        assert!(started.contains(&expected), "{started:?}");
    }
    let sent = Command::new("kill")
        .args(["-TERM", &node.id().to_string()])
        .status()
        .expect("kill");
    assert!(sent.success());
    assert_eq!(wait_for(&mut node), 143, "a preempted node says so");
    let log = node_log(dir.path());
    assert_eq!(
        log.iter().filter(|l| l.starts_with("term worker")).count(),
        2,
        "{log:?}"
    );
}

#[test]
fn swiftbrush_node_stops_the_rest_when_a_worker_fails_and_refuses_zero_devices() {
    let dir = tempfile::tempdir().expect("dir");
    let mut node = node_launcher(
        dir.path(),
        &[
            ("SWIFTBRUSH_NUM_DEVICES", "2"),
            ("SWIFTBRUSH_HEALTH_PORT", "9000"),
        ],
    );
    assert_eq!(wait_for(&mut node), 3, "the failing worker's code");
    let log = node_log(dir.path());
    assert!(
        log.iter()
            .any(|l| l.starts_with("term") && l.contains(":9000")),
        "{log:?}"
    );

    let mut none = node_launcher(dir.path(), &[("SWIFTBRUSH_NUM_DEVICES", "0")]);
    assert_eq!(wait_for(&mut none), 2);
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut none.stderr.take().expect("stderr"), &mut stderr)
        .expect("read");
    assert!(stderr.contains("no devices to train on"), "{stderr}");
}
