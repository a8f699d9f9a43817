"""cluster/: the `ray up` config against the schema Ray ships, the job runtime env, the KubeRay manifests against
what KubeRay and Ray's KubeRay autoscaler read, and the Serve config they share. No cluster is started."""
from __future__ import annotations

import json
import os
import re
import shlex
import tomllib
import zipfile
from pathlib import Path

import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"

# vCPUs and GPUs of the EC2 types in aws.yaml (AWS's published specs); a new type needs its line here.
EC2_TYPES = {"m5.2xlarge": (8, 0), "m5.4xlarge": (16, 0), "g5.2xlarge": (8, 1)}


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# ---------------------------------------------------------------------------------------------- cluster/aws.yaml

@pytest.fixture(scope="module")
def aws() -> dict:
    return _load(CLUSTER / "aws.yaml")


def test_aws_yaml_validates_against_rays_schema(aws):
    import jsonschema

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    validator = jsonschema.validators.validator_for(schema)
    validator.check_schema(schema)
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator(schema).iter_errors(aws)]
    assert not errors, errors


def test_aws_yaml_passes_ray_ups_own_checks(aws):
    """What `ray up` does before it touches AWS: merge Ray's AWS defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(aws))


def test_aws_node_types_are_consistent(aws):
    types = aws["available_node_types"]
    head = aws["head_node_type"]
    assert head in types
    workers = {name: t for name, t in types.items() if name != head}
    assert types[head]["resources"] == {"CPU": 0}, "the head schedules no tasks"
    assert sum(t["max_workers"] for t in workers.values()) == aws["max_workers"]
    assert aws["idle_timeout_minutes"] > 0
    gpu_types = {name for name, t in workers.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_types and set(workers) - gpu_types, "one CPU and one GPU worker type"
    for name, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"], name
    for name, t in types.items():
        instance = t["node_config"]["InstanceType"]
        assert instance in EC2_TYPES, f"{name}: add {instance}'s vCPUs and GPUs to EC2_TYPES"
        vcpus, gpus = EC2_TYPES[instance]
        assert t["resources"].get("CPU", vcpus) <= vcpus, name
        assert t["resources"].get("GPU", 0) == gpus, f"{name}: {instance} has {gpus} GPUs"
    assert any(t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
               for name, t in workers.items() if name not in gpu_types), "CPU workers on spot"


def test_aws_gpu_nodes_take_cuda_torch_cpu_nodes_the_pinned_build(aws):
    """The torch rule of the Makefile, per node type: images and setup commands."""
    from ray.autoscaler._private.util import prepare_config

    cfg = prepare_config(aws)
    default_image = cfg["docker"]["image"]
    for name, t in cfg["available_node_types"].items():
        gpu = t["resources"].get("GPU", 0) > 0
        if name == cfg["head_node_type"]:
            image, commands = cfg["docker"].get("head_image", default_image), cfg["head_setup_commands"]
        else:
            image = t.get("docker", {}).get("worker_image", cfg["docker"].get("worker_image", default_image))
            commands = t.get("worker_setup_commands", cfg["worker_setup_commands"])
        assert image.startswith(f"rayproject/ray:{ray.__version__}-"), f"{name}: Ray image of the client's version"
        assert image.endswith("-gpu" if gpu else "-cpu"), name
        assert f"bash ~/pfsr/cluster/install.sh {'gpu' if gpu else 'cpu'}" in commands, name
    # The install script those commands run: mounted, executable, pinning torch per flavour.
    assert cfg["file_mounts"]["~/pfsr/cluster"] == "./cluster"
    script = CLUSTER / "install.sh"
    assert os.access(script, os.X_OK)
    for flavour in ("cpu", "gpu"):
        line = next(line for line in script.read_text().splitlines() if line.strip().startswith(f"{flavour})"))
        assert f"-c constraints/{flavour}.txt" in line, flavour
        assert "-e ." in line, f"{flavour}: the package itself is installed (Serve's proxies import it)"


def _pin(path: Path, name: str) -> str:
    """The version `name==X` pins in a constraints file."""
    from packaging.requirements import Requirement

    reqs = [Requirement(line) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    (req,) = [r for r in reqs if _name(str(r)) == name]
    (spec,) = req.specifier
    assert spec.operator == "==", (path.name, str(req))
    return spec.version


def test_one_torch_version_on_cpu_and_gpu_nodes():
    """CPU and GPU nodes (cluster/install.sh, hence the images too) pin the same torch release; only the build
    (CPU or CUDA wheel) differs. The CPU pin is also the Makefile's."""
    cpu, gpu = (_pin(ROOT / "constraints" / f"{f}.txt", "torch") for f in ("cpu", "gpu"))
    assert cpu == gpu and "+" not in gpu, (cpu, gpu)
    assert "-c constraints/cpu.txt" in (ROOT / "Makefile").read_text()
    # The Dockerfile's dependency layer runs install.sh with the constraints present.
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    assert "COPY --chown=ray:users constraints/ constraints/" in dockerfile
    assert "bash cluster/install.sh ${FLAVOR}" in dockerfile


def test_pyproject_pins_the_ray_of_the_cluster_images(aws):
    """Client and cluster run one Ray: pyproject's pin = the tag of every image = KubeRay's rayVersion."""
    from packaging.requirements import Requirement

    (ray_req,) = [Requirement(d) for d in _pyproject()["project"]["dependencies"] if _name(d) == "ray"]
    (spec,) = ray_req.specifier
    assert spec.operator == "==", str(ray_req)
    version = spec.version
    images = [aws["docker"]["image"]] + [t["docker"]["worker_image"] for t in aws["available_node_types"].values()
                                         if "worker_image" in t.get("docker", {})]
    images += re.findall(r"^FROM (\S+)", (KUBERAY / "Dockerfile").read_text(), flags=re.M)
    assert len(images) == 3
    for image in images:
        assert image.startswith(f"rayproject/ray:{version}-"), image
    for name in MANIFESTS:
        assert _cluster_spec(_load(KUBERAY / name))["rayVersion"] == version, name
    assert ray.__version__ == version, "the installed Ray is the pinned one (make install)"


def test_file_mounts_hold_what_the_nodes_install_and_not_the_checkout(aws):
    """`ray up` hashes every file under the mounted paths (ray.autoscaler._private.util.hash_runtime_conf walks them
    with os.walk, ignoring the rsync filters) and reruns the setup commands when the hash changes: no mount may
    take in the checkout's root (its .venv, runs/, demo_out/)."""
    mounts = aws["file_mounts"]
    tops = {name for line in (ROOT / ".gitignore").read_text().splitlines()
            if (name := line.strip().strip("/")) and "*" not in name}
    assert {".venv", "runs", "demo_out"} <= tops
    for remote, local in mounts.items():
        rel = Path(local).relative_to(".")
        assert rel.parts and rel.parts[0] not in tops | {".git"}, local
        assert (ROOT / rel).exists(), local
        assert remote == f"~/pfsr/{rel.as_posix()}", (remote, local)
    mounted = {Path(local).relative_to(".").as_posix() for local in mounts.values()}
    # What `pip install -e .` in ~/pfsr (cluster/install.sh cds there) reads: the project file, its readme, the
    # package folder, the constraints the script names, and the script itself.
    project = _pyproject()
    needed = {"pyproject.toml", project["project"]["readme"], *project["tool"]["setuptools"]["packages"]["find"]["where"],
              "cluster"}
    needed |= {Path(c).parts[0] for c in re.findall(r"-c (\S+)", (CLUSTER / "install.sh").read_text())}
    # The job entry points and configs of the README, for jobs started on the head (`ray exec`, `ray submit`).
    needed |= {"jobs", "data_prep", "configs"}
    assert needed <= mounted, needed - mounted


# --------------------------------------------------------------------------------------- cluster/runtime_env.yaml

@pytest.fixture(scope="module")
def runtime_env() -> dict:
    return _load(CLUSTER / "runtime_env.yaml")


def _name(requirement: str) -> str:
    from packaging.requirements import Requirement

    return re.sub(r"[-_.]+", "-", Requirement(requirement).name).lower()


def _requires_closure(requirement: str, seen: set[str] | None = None) -> set[str]:
    """Names of everything pip would install for `requirement`, from the installed packages' metadata."""
    from importlib.metadata import PackageNotFoundError, requires
    from packaging.requirements import Requirement

    seen = set() if seen is None else seen
    req = Requirement(requirement)
    name = _name(requirement)
    if name in seen:
        return seen
    seen.add(name)
    try:
        deps = requires(name) or []
    except PackageNotFoundError:
        pytest.fail(f"{name} is not installed; cannot check what it pulls")
    for dep in deps:
        dep_req = Requirement(dep)
        extras = req.extras or {""}
        if dep_req.marker is None or any(dep_req.marker.evaluate({"extra": e}) for e in extras):
            _requires_closure(dep, seen)
    return seen


def test_runtime_env_parses_as_a_ray_runtime_env(runtime_env, monkeypatch):
    from ray.runtime_env import RuntimeEnv

    monkeypatch.chdir(ROOT)  # `ray job submit` runs from the repository root; paths are relative to it
    env = RuntimeEnv(**runtime_env)
    assert env.working_dir() == "."
    assert env.py_modules() == ["platform/pfsr"]


def test_runtime_env_never_pulls_torch(runtime_env):
    packages = runtime_env["pip"]["packages"]
    names = {_name(p) for p in packages}
    assert not names & {"torch", "torchvision", "torchaudio"}, names
    assert "ray" not in names, "Ray comes from the cluster; a pip ray would replace the cluster's"
    for p in packages:
        pulled = _requires_closure(p)
        assert "torch" not in pulled, f"{p} requires torch: pip could fetch a torch build other than the image's"


def test_runtime_env_pip_list_follows_pyproject(runtime_env):
    """Every dependency of pyproject.toml is in the pip list with the same specifier, except torch, what is
    built on torch (from the image) and Ray (from the cluster)."""
    deps = _pyproject()["project"]["dependencies"]
    expected = {_name(d): d for d in deps
                if _name(d) != "ray" and "torch" not in _requires_closure(d)}
    got = {_name(p): p for p in runtime_env["pip"]["packages"]}
    assert got == expected


def test_working_dir_package_ships_code_not_the_virtualenv(runtime_env, tmp_path):
    """The archive `--working-dir .` uploads, made by Ray's own packaging (honours .gitignore and excludes)."""
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE, create_package

    target = tmp_path / "working_dir.zip"
    create_package(str(ROOT), target, include_gitignore=True, excludes=runtime_env["excludes"])
    names = zipfile.ZipFile(target).namelist()
    for needed in ("platform/pfsr/cli.py", "configs/tiny.yaml", "cluster/runtime_env.yaml", "pyproject.toml"):
        assert needed in names, needed
    assert not [n for n in names if n.startswith((".venv/", ".git/"))]
    assert target.stat().st_size < GCS_STORAGE_MAX_SIZE // 10


# ---------------------------------------------------------------------------------------------- cluster/kuberay/

MANIFESTS = {"raycluster.yaml": "RayCluster", "rayjob-train.yaml": "RayJob", "rayservice.yaml": "RayService"}
CLUSTER_SPEC_KEY = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _cluster_spec(manifest: dict) -> dict:
    key = CLUSTER_SPEC_KEY[manifest["kind"]]
    return manifest["spec"] if key is None else manifest["spec"][key]


@pytest.fixture(scope="module", params=sorted(MANIFESTS))
def manifest(request) -> dict:
    return _load(KUBERAY / request.param)


def _images() -> dict[str, str]:
    version = _pyproject()["project"]["version"]
    return {"cpu": f"pfsr:{version}-cpu", "gpu": f"pfsr:{version}-gpu"}


def _check_pod_template(template: dict, where: str, gpu: bool) -> None:
    spec = template["spec"]
    containers = spec["containers"]
    assert containers, where
    ray_container = containers[0]  # KubeRay: the Ray container is the first
    assert ray_container["name"] and DNS_1123.match(ray_container["name"]), where
    assert ray_container["image"] == _images()["gpu" if gpu else "cpu"], where
    resources = ray_container["resources"]
    for key in ("cpu", "memory"):
        assert key in resources["limits"], f"{where}: limits.{key} (Ray reads its CPUs and memory from them)"
    assert resources["requests"] == resources["limits"], f"{where}: requests = limits (Guaranteed QoS)"
    assert ("nvidia.com/gpu" in resources["limits"]) == gpu, where
    assert spec["serviceAccountName"] == "pfsr-ray", where


def test_kuberay_manifest_has_the_fields_kuberay_requires(manifest):
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] in CLUSTER_SPEC_KEY
    assert DNS_1123.match(manifest["metadata"]["name"])
    spec = _cluster_spec(manifest)
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in head["rayStartParams"].items()), \
        "rayStartParams values are strings in the CRD"
    _check_pod_template(head["template"], "head", gpu=False)
    groups = spec["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups)
    for g in groups:
        where = g["groupName"]
        assert DNS_1123.match(where)
        assert isinstance(g["rayStartParams"], dict), where
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], where
        _check_pod_template(g["template"], where, gpu=where == "gpu")


def test_kuberay_clusters_read_by_rays_kuberay_autoscaler(manifest):
    """Ray's own translation of a RayCluster CR into an autoscaling config (it validates the result)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = {"metadata": {"name": manifest["metadata"]["name"], "namespace": "default"}, "spec": _cluster_spec(manifest)}
    config = _derive_autoscaling_config_from_ray_cr(cr)
    types = config["available_node_types"]
    assert types["headgroup"]["resources"]["CPU"] == 0
    for g in _cluster_spec(manifest)["workerGroupSpecs"]:
        resources = types[g["groupName"]]["resources"]
        assert resources["CPU"] >= 1
        assert resources.get("GPU", 0) == (1 if g["groupName"] == "gpu" else 0)
        assert types[g["groupName"]]["max_workers"] == g["maxReplicas"]


# The Services KubeRay 1.4 creates for a manifest, named as its controllers name them. A name is a tuple of
# characters in which RAND stands for one character of a random suffix (matched to any character: a collision
# found is possible, one not found impossible).
RAND = None
# k8s.io/apimachinery/pkg/util/rand String(5) (alphabet "bcdfghjklmnpqrstvwxz2456789"), called by
# ray-operator/controllers/ray/utils/util.go GenerateRayClusterName: "<RayService or RayJob name>-<5 random>".
CLUSTER_SUFFIX = ("-", *[RAND] * 5)


def _cluster_services(cluster_name: tuple, spec: dict, annotations: dict) -> set[tuple]:
    """A RayCluster's Services (ray-operator/controllers/ray/raycluster_controller.go):
    - head: utils/util.go GenerateHeadServiceName(RayClusterCRD, ...): spec.headGroupSpec.headService's name if set,
      else "<cluster>-head-svc";
    - serve, only with the annotation ray.io/enable-serve-service=true (reconcileServeService): common/service.go
      BuildServeService -> utils/util.go GenerateServeServiceName: "<cluster>-serve-svc";
    - headless, only for a worker group with numOfHosts > 1: common/service.go BuildHeadlessServiceForRayCluster:
      "<cluster>-headless"."""
    custom = (spec["headGroupSpec"].get("headService") or {}).get("metadata", {}).get("name")
    names = {tuple(custom) if custom else cluster_name + tuple("-head-svc")}
    if annotations.get("ray.io/enable-serve-service") == "true":
        names.add(cluster_name + tuple("-serve-svc"))
    if any(g.get("numOfHosts", 1) > 1 for g in spec.get("workerGroupSpecs", [])):
        names.add(cluster_name + tuple("-headless"))
    return names


def _kuberay_services(manifest: dict) -> set[tuple]:
    name = tuple(manifest["metadata"]["name"])
    annotations = manifest["metadata"].get("annotations", {})
    spec = manifest["spec"]
    if manifest["kind"] == "RayCluster":
        return _cluster_services(name, spec, annotations)
    if manifest["kind"] == "RayService":
        # rayservice_controller.go reconcileServices: the RayService's own head and serve Services (common/service.go
        # BuildHeadServiceForRayService -> GenerateHeadServiceName(RayServiceCRD, ...) = "<name>-head-svc", which
        # ignores headService; BuildServeService: spec.serveService's name if set, else GenerateServeServiceName),
        # plus those of its cluster "<name>-<5 random>" (GenerateRayClusterName).
        serve = (spec.get("serveService") or {}).get("metadata", {}).get("name")
        own = {name + tuple("-head-svc"), tuple(serve) if serve else name + tuple("-serve-svc")}
        return own | _cluster_services(name + CLUSTER_SUFFIX, spec["rayClusterConfig"], {})
    assert manifest["kind"] == "RayJob"
    # rayjob_controller.go initRayJobStatusIfNeed: a RayJob with a clusterSelector uses an existing cluster,
    # otherwise it creates "<name>-<5 random>" (GenerateRayClusterName).
    if spec.get("clusterSelector"):
        return set()
    return _cluster_services(name + CLUSTER_SUFFIX, spec["rayClusterSpec"], {})


def _may_equal(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(x is RAND or y is RAND or x == y for x, y in zip(a, b))


def test_kuberay_manifests_never_share_a_service():
    """Applied together (as the README does), no two Services the operator creates may get one name: the
    port-forward and the jobs would reach the wrong cluster."""
    services = {name: _kuberay_services(_load(KUBERAY / name)) for name in sorted(MANIFESTS)}
    assert {"".join(s) for s in services["raycluster.yaml"]} == {"pfsr-cluster-head-svc"}
    assert {"".join(s) for s in services["rayservice.yaml"] if RAND not in s} == {"pfsr-head-svc", "pfsr-serve-svc"}
    # The model itself: a RayCluster named pfsr collides with the RayService pfsr's head Service, one named like the
    # RayService's cluster collides with that cluster's.
    service = _kuberay_services(_load(KUBERAY / "rayservice.yaml"))
    assert _kuberay_services({"kind": "RayCluster", "metadata": {"name": "pfsr"}, "spec": {"headGroupSpec": {}}}) & service
    twin = {"kind": "RayCluster", "metadata": {"name": "pfsr-b2z4k"}, "spec": {"headGroupSpec": {}}}
    assert any(_may_equal(a, b) for a in _kuberay_services(twin) for b in service)

    everything = [(file, s) for file, names in services.items() for s in names]
    for i, (file_a, a) in enumerate(everything):
        for file_b, b in everything[i + 1:]:
            assert not _may_equal(a, b), f"{file_a} and {file_b} can both create Service {''.join(x or '?' for x in a)}"
    for file, names in services.items():
        for s in names:
            assert len(s) <= 63, (file, "".join(x or "?" for x in s))  # a Service name is a DNS-1035 label


def test_readme_port_forwards_reach_the_right_services():
    commands = [argv for argv in _readme_commands() if argv[:2] == ["kubectl", "port-forward"]]
    targets = {argv[2].removeprefix("svc/"): argv[3] for argv in commands}
    head = {"".join(s) for s in _kuberay_services(_load(KUBERAY / "raycluster.yaml"))}
    serve = {"".join(s) for s in _kuberay_services(_load(KUBERAY / "rayservice.yaml")) if RAND not in s}
    dashboard = [svc for svc, ports in targets.items() if ports == "8265:8265"]
    assert dashboard and set(dashboard) <= head, targets
    endpoint = [svc for svc, ports in targets.items() if ports == "8000:8000"]
    assert endpoint == ["pfsr-serve-svc"] and set(endpoint) <= serve, targets


def _parse_cli(command: str, script: str, subcommand: str):
    """`python SCRIPT ARGS...` -> the argparse namespace of `pfsr SUBCOMMAND ARGS...` (the binding interface)."""
    from pfsr.cli import build_parser

    argv = shlex.split(command)
    assert argv[:2] == ["python", script], argv
    return build_parser().parse_args([subcommand, *argv[2:]])


def test_rayjob_trains_with_the_cli_flags():
    job = _load(KUBERAY / "rayjob-train.yaml")
    args = _parse_cli(job["spec"]["entrypoint"], "jobs/train.py", "train")
    assert (ROOT / args.config).is_file()
    assert args.gpu
    gpu_group = next(g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert args.workers <= gpu_group["maxReplicas"], "each --gpu worker needs a GPU pod"
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"]) == {"working_dir": "/home/ray/pfsr"}
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_rayservice_serves_cluster_serve_yaml():
    from ray.serve.schema import ServeDeploySchema

    service = _load(KUBERAY / "rayservice.yaml")
    serve_text = (CLUSTER / "serve.yaml").read_text()
    assert service["spec"]["serveConfigV2"] == serve_text, \
        "serveConfigV2 must be cluster/serve.yaml verbatim: paste the file into the block"
    serve = ServeDeploySchema.model_validate(yaml.safe_load(serve_text))
    gpu_group = next(g for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    for app in serve.applications:
        for d in app.deployments:
            autoscaling = d.autoscaling_config
            assert autoscaling is not None, f"{d.name}: autoscaling_config"
            gpus = getattr(d.ray_actor_options, "num_gpus", None) or 0
            assert gpus == 1, f"{d.name}: one GPU per replica (the RayService has GPU worker pods only)"
            assert autoscaling["max_replicas"] <= gpu_group["maxReplicas"], d.name


def test_serve_yaml_names_what_its_import_path_builds():
    """`serve deploy` resolves import_path and applies the config to deployments of those names only."""
    from ray.serve._private.utils import import_attr

    for app in yaml.safe_load((CLUSTER / "serve.yaml").read_text())["applications"]:
        built = import_attr(app["import_path"])(app["args"])  # binds only: nothing loads the checkpoint yet
        assert [d["name"] for d in app["deployments"]] == [built._bound_deployment.name]


def test_s3_uris_name_the_bucket_placeholder():
    """Every bucket in the shipped manifests is PFSR_BUCKET, which the README's commands replace."""
    for path in [CLUSTER / "serve.yaml", *sorted(KUBERAY.glob("*.yaml"))]:
        buckets = set(re.findall(r"s3://([^/\s]+)", path.read_text()))
        assert buckets <= {"PFSR_BUCKET"}, (path.name, buckets)


def test_dockerfile_builds_from_rays_image_of_this_version():
    text = (KUBERAY / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM (\S+)", text, flags=re.M)
    assert base == f"rayproject/ray:{ray.__version__}-py311-${{FLAVOR}}"
    for src in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, flags=re.M):
        for path in src.split():
            assert (ROOT / path).exists(), path


# ------------------------------------------------------------------------- Serve: the application's code, the proxy

PROXY_CALLBACK_VAR = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"  # ray/serve/_private/constants.py
PROXY_CALLBACK = "pfsr.pipeline.proxy.proxy_middlewares"


def _env_of_ray_start(command: str) -> dict[str, str]:
    """The VAR=value assignments in front of `ray start` in one start command of cluster/aws.yaml."""
    (part,) = [p for p in command.split(";") if "ray start" in p]
    argv = shlex.split(part)
    env = {}
    while "=" in argv[0]:
        key, value = argv.pop(0).split("=", 1)
        env[key] = value
    assert argv[:2] == ["ray", "start"], command
    return env


def test_every_node_that_can_run_a_serve_proxy_loads_pfsrs_middleware(aws):
    """Serve starts an HTTP proxy on every node (proxy_location EveryNode); each reads the hook variable of its
    own environment, which Ray's workers inherit from `ray start` or the container."""
    from ray.autoscaler._private.util import prepare_config

    assert yaml.safe_load((CLUSTER / "serve.yaml").read_text())["proxy_location"] == "EveryNode"
    cfg = prepare_config(aws)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts, key
        for command in starts:
            assert _env_of_ray_start(command).get(PROXY_CALLBACK_VAR) == PROXY_CALLBACK, command
    # Every container of a cluster that can serve; the RayJob only trains (no serve port, no Serve).
    for name in MANIFESTS:
        spec = _cluster_spec(_load(KUBERAY / name))
        templates = [("head", spec["headGroupSpec"]["template"])]
        templates += [(g["groupName"], g["template"]) for g in spec["workerGroupSpecs"]]
        ports = {p["name"] for p in templates[0][1]["spec"]["containers"][0].get("ports", [])}
        if "serve" not in ports:
            assert name == "rayjob-train.yaml", name
            continue
        for group, template in templates:
            for container in template["spec"]["containers"]:
                values = [e.get("value") for e in container.get("env", []) if e["name"] == PROXY_CALLBACK_VAR]
                assert values == [PROXY_CALLBACK], (name, group, container["name"], values)
    # The image, for any pod built from it, with the package installed from its code (not only a runtime_env).
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    assert re.findall(rf"^ENV {PROXY_CALLBACK_VAR}=(\S+)$", dockerfile, flags=re.M) == [PROXY_CALLBACK]
    lines = dockerfile.splitlines()
    copy_code = lines.index("COPY --chown=ray:users platform/ platform/")
    assert any(re.match(r"RUN pip install .*-e \.$", line) for line in lines[copy_code:])
    # Nowhere another value (a docker --env, a second assignment).
    for path in [CLUSTER / "aws.yaml", *sorted(KUBERAY.iterdir())]:
        text = path.read_text()
        values = re.findall(rf"{PROXY_CALLBACK_VAR}\W+(?:value: )?([\w.:]+)", text)
        assert set(values) <= {PROXY_CALLBACK}, (path.name, values)


def test_proxy_callback_names_a_function_of_the_package():
    """The hook imports the callback in the proxy's process: it must be a function of the installed package."""
    from ray.serve._private.utils import import_attr

    assert callable(import_attr(PROXY_CALLBACK))


def test_serve_application_ships_the_checkout(tmp_path):
    """serve.yaml's runtime_env names the archives cluster/package_code.py writes; unpacked as a node unpacks a
    remote package, they give the application this checkout's pfsr and the checkout as working directory."""
    import importlib.machinery
    import importlib.util

    from ray._private.runtime_env.packaging import unzip_package

    spec = importlib.util.spec_from_file_location("package_code", CLUSTER / "package_code.py")
    package_code = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(package_code)

    (app,) = yaml.safe_load((CLUSTER / "serve.yaml").read_text())["applications"]
    prefix = "s3://PFSR_BUCKET/code/PFSR_CODE"
    assert app["runtime_env"] == {"working_dir": f"{prefix}/{package_code.WORKING_DIR_ZIP}",
                                  "py_modules": [f"{prefix}/{package_code.PY_MODULES_ZIP}"]}
    code = package_code.package(tmp_path / "out")
    assert re.fullmatch(r"[0-9a-f]{16,}", code), code
    archives = tmp_path / "out" / code
    assert sorted(p.name for p in archives.iterdir()) == sorted([package_code.WORKING_DIR_ZIP, package_code.PY_MODULES_ZIP])

    # ray/_private/runtime_env/packaging.py download_and_unpack_package, remote protocols (s3): unzip with
    # remove_top_level_directory=True; py_modules then puts each unpacked folder on PYTHONPATH.
    unpacked = {}
    for name in (package_code.WORKING_DIR_ZIP, package_code.PY_MODULES_ZIP):
        names = zipfile.ZipFile(archives / name).namelist()
        assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc") or ".venv/" in n], name
        unpacked[name] = tmp_path / name.removesuffix(".zip")
        unzip_package(str(archives / name), str(unpacked[name]), remove_top_level_directory=True, unlink_zip=False)
    module_dir = unpacked[package_code.PY_MODULES_ZIP]
    found = importlib.machinery.PathFinder.find_spec("pfsr", [str(module_dir)])
    assert found is not None and Path(found.origin) == module_dir / "pfsr" / "__init__.py"
    module, attr = app["import_path"].split(":")
    assert (module_dir / Path(*module.split("."))).with_suffix(".py").is_file(), app["import_path"]
    shipped = sorted(p.relative_to(module_dir).as_posix() for p in module_dir.rglob("*.py"))
    local = sorted(p.relative_to(ROOT / "platform").as_posix() for p in (ROOT / "platform").rglob("*.py"))
    assert shipped == local
    working_dir = unpacked[package_code.WORKING_DIR_ZIP]
    for needed in ("configs/tiny.yaml", "jobs/train.py", "platform/pfsr/cli.py", "pyproject.toml"):
        assert (working_dir / needed).is_file(), needed
    assert not (working_dir / ".venv").exists()


# ---------------------------------------------------------------------------------------- README: Run on a cluster

SCRIPTS = {"data_prep/shard.py": "prep", "jobs/train.py": "train", "jobs/evaluate.py": "evaluate"}


def _readme_commands() -> list[list[str]]:
    """The shell commands of the README's "Run on a cluster" section, one argv per logical line."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Run on a cluster\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [argv for line in lines if (argv := shlex.split(line, comments=True))]


def test_readme_stages_use_the_cli_flags():
    """Every stage the README submits parses with pfsr's own parser; stage 2 and 3 start from the run before."""
    from pfsr.cli import build_parser

    submitted = []
    for argv in _readme_commands():
        if argv[:3] != ["ray", "job", "submit"]:
            continue
        ray_args, command = argv[3:argv.index("--")], argv[argv.index("--") + 1:]
        assert ray_args[ray_args.index("--runtime-env") + 1] == "cluster/runtime_env.yaml"
        assert ray_args[ray_args.index("--working-dir") + 1] == "."
        subcommand, rest = (command[1], command[2:]) if command[0] == "pfsr" else (SCRIPTS[command[1]], command[2:])
        submitted.append((subcommand, build_parser().parse_args([subcommand, *rest])))
    assert [s for s, _ in submitted] == ["prep", "prep", "train", "train", "train", "export", "evaluate"]

    trains = [args for s, args in submitted if s == "train"]
    assert [(ROOT / a.config).is_file() for a in trains] == [True] * 3
    assert trains[0].init is None
    for before, after in zip(trains, trains[1:]):
        assert after.init == f"{before.storage}/{before.name}"
    export = next(args for s, args in submitted if s == "export")
    assert export.run == f"{trains[-1].storage}/{trains[-1].name}"
    evaluate = next(args for s, args in submitted if s == "evaluate")
    assert evaluate.checkpoint == export.out


def test_readme_fills_the_placeholders_the_manifests_use():
    commands = [" ".join(argv) for argv in _readme_commands()]
    serve_sed = [c for c in commands if c.startswith("sed") and "cluster/serve.yaml" in c]
    assert serve_sed and all("s|PFSR_BUCKET|$BUCKET|g" in c and "s|PFSR_CODE|$CODE|g" in c for c in serve_sed)
    for name in MANIFESTS:
        (apply,) = [c for c in commands if f"cluster/kuberay/{name}" in c]
        assert "s|PFSR_BUCKET|$BUCKET|g" in apply and "s|image: pfsr:|image: $REGISTRY/pfsr:|" in apply, name
        assert ("s|PFSR_CODE|$CODE|g" in apply) == ("PFSR_CODE" in (KUBERAY / name).read_text()), name
        assert apply.endswith("kubectl apply -f -"), name
    # Whatever fills in PFSR_CODE first packs and uploads the code under that hash, where serve.yaml looks for it.
    for i, c in enumerate(commands):
        if "s|PFSR_CODE|$CODE|g" in c:
            pack = [p for p in commands[:i] if "cluster/package_code.py" in p][-1]
            out = re.search(r"package_code\.py (\S+)\)", pack).group(1)
            assert f"aws s3 sync {out}/ s3://$BUCKET/code/" in pack, pack
    for path in ("infra/cloudformation.yaml", "cluster/aws.yaml", "cluster/kuberay/Dockerfile", "infra/local-s3/run.py"):
        assert any(path in c for c in commands), path
