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
    # The install script those commands run: there, executable, pinning torch on CPU as the Makefile does.
    assert cfg["file_mounts"]["~/pfsr"] == "."
    script = CLUSTER / "install.sh"
    assert os.access(script, os.X_OK)
    cpu_line = next(line for line in script.read_text().splitlines() if line.strip().startswith("cpu)"))
    assert "-c constraints/cpu.txt" in cpu_line
    assert "torch==" in (ROOT / "constraints" / "cpu.txt").read_text()
    # rsync honours .gitignore, which must keep the virtualenv on the laptop.
    assert ".gitignore" in cfg["rsync_filter"] and ".venv/" in (ROOT / ".gitignore").read_text().split()


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
    assert any("s|PFSR_BUCKET|$BUCKET|g" in c and "cluster/serve.yaml" in c for c in commands)
    for name in MANIFESTS:
        (apply,) = [c for c in commands if f"cluster/kuberay/{name}" in c]
        assert "s|PFSR_BUCKET|$BUCKET|g" in apply and "s|image: pfsr:|image: $REGISTRY/pfsr:|" in apply, name
        assert apply.endswith("kubectl apply -f -"), name
    for path in ("infra/cloudformation.yaml", "cluster/aws.yaml", "cluster/kuberay/Dockerfile", "infra/local-s3/run.py"):
        assert any(path in c for c in commands), path
