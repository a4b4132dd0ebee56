//! deploy/docker/Dockerfile: stages, pinned bases, the libtorch paths the
//! rpath needs, USER, ENTRYPOINT, no secrets, every copied path present.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use super::{IMAGE_UID, read, root};

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
        requirements.lines().any(|l| l.trim() == "torch==2.11.0"),
        "requirements-torch.txt pins torch==2.11.0 (tch 0.24)"
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
