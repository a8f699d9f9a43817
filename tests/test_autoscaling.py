"""Autoscaling rehearsal (issue 16): a head on this machine runs Ray's v1 autoscaler with the fake multi-node
provider and cluster/fake_multinode.yaml (the node types of cluster/aws.yaml, scaled down). Pending Ray Data
tasks and Ray Train workers start worker nodes; nodes left idle are removed after the idle timeout."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import ray
import yaml

from tests import fault_scenarios as fs
from tests.multinode import LocalCluster, wait_for

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def test_fake_multinode_yaml_mirrors_aws_yaml():
    import jsonschema

    fake = yaml.safe_load((CLUSTER / "fake_multinode.yaml").read_text())
    aws = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    assert not [e.message for e in jsonschema.validators.validator_for(schema)(schema).iter_errors(fake)]
    assert fake["provider"]["type"] == "fake_multinode"
    types, aws_types = dict(fake["available_node_types"]), dict(aws["available_node_types"])
    # The fake provider names the head's type itself; the worker types are aws.yaml's.
    types[aws["head_node_type"]] = types.pop(fake["head_node_type"])
    assert set(types) == set(aws_types)
    for name, node in types.items():
        assert ("GPU" in node["resources"]) == ("GPU" in aws_types[name]["resources"]), name
        assert (node["resources"]["CPU"] == 0) == (aws_types[name]["resources"]["CPU"] == 0), name
    assert fake["max_workers"] == sum(t.get("max_workers", 0) for n, t in types.items() if n != aws["head_node_type"])


@pytest.mark.ray
@pytest.mark.slow
def test_pending_work_starts_nodes_and_idle_nodes_are_removed(photos, tmp_path):
    cluster = LocalCluster(tmp_path / "cluster", workers=0, autoscaling_config=CLUSTER / "fake_multinode.yaml")
    try:
        assert cluster.worker_node_resources() == []
        logs = tmp_path / "logs"
        logs.mkdir()
        source = fs.write_photos(photos, fs.TRAIN_PHOTOS[:2], tmp_path / "photos")
        fs.run_driver(cluster, ["prep", "--source", str(source), "--out", str(tmp_path / "shards"), *fs.PREP_ARGS],
                      logs / "prep.log")
        # Idle after prep: the autoscaler ends every worker node.
        wait_for(lambda: cluster.worker_node_resources() == [], 180, "idle nodes to be removed", interval=2)

        seen: list[list[dict]] = []
        proc = cluster.popen(["train", "--config", str(fs.train_config(tmp_path)), "--data", str(tmp_path / "shards"),
                              "--workers", "2", "--steps", "2", "--storage", str(tmp_path / "runs"), "--name", "as"],
                             logs / "train.log")
        watcher = threading.Thread(target=lambda: [seen.append(cluster.worker_node_resources())
                                                  for _ in iter(lambda: proc.poll() is None, False)])
        watcher.start()
        assert proc.wait(timeout=900) == 0, (logs / "train.log").read_text()[-4000:]
        watcher.join()
        peak = max(seen, key=len)
        # The 2 pending workers (1 CPU each) started 2 CPU nodes, not the GPU type.
        assert len(peak) == 2 and all(r.get("CPU") == 1 and "GPU" not in r for r in peak), seen
        wait_for(lambda: cluster.worker_node_resources() == [], 180, "idle nodes to be removed", interval=2)
    finally:
        cluster.shutdown()
