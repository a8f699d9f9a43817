"""Node loss on a multi-node local cluster (issue 16): one head and 3 worker nodes of 1 CPU (the session's
multinode_cluster); each test SIGKILLs a whole worker node (raylet, agents, workers) at a defined point of a
`pfsr` CLI run on the head and checks that nothing is lost, nothing is doubled and the result equals an
uninterrupted run's. The figures are bench/faults.py's (same scenarios, tests/fault_scenarios.py)."""
from __future__ import annotations

import pytest

from tests import fault_scenarios as fs

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.multinode]


@pytest.fixture
def cluster(multinode_cluster):
    """The shared cluster with its 3 worker nodes alive (nodes killed by an earlier test are replaced)."""
    multinode_cluster.replace_dead(3)
    return multinode_cluster


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    return tmp_path_factory.mktemp("fault_logs")


@pytest.fixture(scope="module")
def train_photos(photos, tmp_path_factory):
    return fs.write_photos(photos, fs.TRAIN_PHOTOS, tmp_path_factory.mktemp("fault_photos"))


@pytest.fixture(scope="module")
def reference_shards(multinode_cluster, train_photos, tmp_path_factory, logs):
    """`pfsr prep` on the multi-node cluster without faults: the reference output and the training data."""
    multinode_cluster.replace_dead(3)
    return fs.prep_reference(multinode_cluster, train_photos, tmp_path_factory.mktemp("prep") / "whole", logs)


def test_prep_node_death_output_identical(cluster, train_photos, reference_shards, tmp_path, logs):
    r = fs.prep_node_death(cluster, train_photos, reference_shards, tmp_path / "killed", logs)
    assert r["shards_done_at_kill"] < r["shards"], r  # the node died mid-run, not after it
    assert r["samples_lost"] == 0 and r["duplicates"] == 0, r
    assert r["manifest_identical"] and r["shards_identical"], r
    assert r["leftovers"] == [], r
    assert r["reruns"] == 0 or r["first_run_exit_code"] != 0, r


def test_train_node_death_resumes_and_equals_uninterrupted(cluster, reference_shards, tmp_path, logs):
    config = fs.train_config(tmp_path)
    reference = fs.train_reference(cluster, config, reference_shards, tmp_path / "runs", logs)
    cluster.replace_dead(3)
    r = fs.train_node_death(cluster, config, reference_shards, tmp_path / "runs", reference, logs)
    assert len(r["worker_nodes_before"]) == 2, r  # one DDP worker per 1-CPU node
    assert r["worker_group_starts"] == 2, r  # restarted once, on the surviving and the spare node
    assert r["restored_from_step"] >= r["checkpoint_registered_at_kill"] >= fs.CHECKPOINT_EVERY, r
    assert r["final_step"] == fs.TRAIN_STEPS, r
    assert r["restored_digests_match"], r
    assert r["data_position_equal"] and r["samples_lost"] == 0 and r["duplicates"] == 0, r
    # Same noise per (seed, rank, step), one thread per worker, 2-rank all-reduce: bit-identical.
    assert r["final_state_equal"] and r["final_max_abs_difference"] == 0.0, r


def test_evaluate_replica_node_death_scores_each_image_once(cluster, photos, tiny_checkpoint, tmp_path, logs):
    images = fs.write_eval_images(photos["coffee"], tmp_path / "images")
    r = fs.evaluate_node_death(cluster, tiny_checkpoint, images, tmp_path / "eval", logs)
    assert len(r["replica_nodes_before"]) == 2, r
    assert r["samples_lost"] == 0 and r["duplicates"] == 0 and r["unexpected"] == 0, r
    assert r["scored"] == r["images"] == r["n_images_reported"] == 24, r


def test_s3_faults_prep_train_resume_export_evaluate(cluster, s3_fault_proxy, s3_bucket, train_photos,
                                                     reference_shards, photos, tmp_path, logs):
    """Every S3 request of the cluster passes a proxy that answers 500 / 503 SlowDown, resets connections and
    delays, at most twice in a row per key: the stages retry and finish with the fault-free outputs."""
    images = fs.write_eval_images(photos["coffee"][:192, :288], tmp_path / "images")
    r = fs.s3_faults(cluster, s3_fault_proxy.schedule, s3_bucket, train_photos, reference_shards,
                     fs.train_config(tmp_path), images, logs)
    assert all(r["faults_injected"].get(kind, 0) > 0 for kind in ("500", "503", "reset", "latency")), r
    assert r["shards_identical"] and r["manifest_rows_equal"], r
    assert r["final_step"] == 2 * fs.CHECKPOINT_EVERY and r["resumed_from"] == fs.CHECKPOINT_EVERY, r
    assert r["export_equals_ema"], r
    assert r["scored"] == r["images"] == 6 and r["duplicates"] == 0, r
    assert r["half_written"] == [], r


def test_serve_node_death_under_twice_capacity(cluster, tiny_checkpoint, tmp_path, logs):
    r = fs.serve_node_death(cluster, tiny_checkpoint, tmp_path, logs, load_s=20, capacity_s=10)
    assert len(r["replica_nodes_before"]) == 2 and r["capacity_rps"] > 0, r
    assert "500" not in r["requests_by_status"] and r["other_errors"] == {}, r
    assert r["non_200_without_json"] == 0 and r["503_without_retry_after"] == 0, r
    assert r["seconds_to_first_200_after_kill"] is not None and r["seconds_to_2_replicas_again"] is not None, r
