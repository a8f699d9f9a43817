"""infra/: the CloudFormation template passes cfn-lint and keeps its promises (private, encrypted, versioned
bucket; node roles limited to it); infra/local-s3 serves a real S3 endpoint."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "infra" / "cloudformation.yaml"


@pytest.fixture(scope="module")
def template() -> dict:
    from cfnlint.decode import decode

    tpl, errors = decode(str(TEMPLATE))  # the YAML with !Sub / !GetAtt as Fn:: dicts
    assert not errors, errors
    return tpl


def _resources(tpl: dict, kind: str) -> dict:
    return {name: r for name, r in tpl["Resources"].items() if r["Type"] == kind}


def _statements(policy_document: dict) -> list[dict]:
    return policy_document["Statement"]


def _as_list(x):
    return x if isinstance(x, list) else [x]


def test_cfn_lint_passes():
    cfn_lint = Path(sys.executable).with_name("cfn-lint")
    r = subprocess.run([str(cfn_lint), str(TEMPLATE)], capture_output=True, text=True)
    # cfn-lint's exit code is a bit mask: 2 errors, 4 warnings, 8 informational; none of them here.
    assert r.returncode == 0, r.stdout + r.stderr


def test_bucket_is_private_encrypted_versioned(template):
    (bucket_name, bucket), = _resources(template, "AWS::S3::Bucket").items()
    props = bucket["Properties"]
    assert props["VersioningConfiguration"]["Status"] == "Enabled"
    sse = props["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]["ServerSideEncryptionByDefault"]
    assert sse["SSEAlgorithm"] in ("AES256", "aws:kms")
    assert all(props["PublicAccessBlockConfiguration"][k] is True for k in
               ("BlockPublicAcls", "BlockPublicPolicy", "IgnorePublicAcls", "RestrictPublicBuckets"))
    assert bucket["DeletionPolicy"] == "Retain"

    (policy,) = _resources(template, "AWS::S3::BucketPolicy").values()
    assert policy["Properties"]["Bucket"] == {"Ref": bucket_name}
    tls = [s for s in _statements(policy["Properties"]["PolicyDocument"])
           if s["Effect"] == "Deny" and s.get("Condition", {}).get("Bool", {}).get("aws:SecureTransport") == "false"]
    assert tls and tls[0]["Action"] == "s3:*"


def test_node_roles_reach_this_bucket_only(template):
    (bucket_name,) = _resources(template, "AWS::S3::Bucket")
    roles = _resources(template, "AWS::IAM::Role")
    managed = _resources(template, "AWS::IAM::ManagedPolicy")
    s3_statements = [s for p in managed.values() for s in _statements(p["Properties"]["PolicyDocument"])]
    s3_statements += [s for r in roles.values() for p in r["Properties"].get("Policies", [])
                      for s in _statements(p["PolicyDocument"])
                      if any(str(a).startswith("s3:") for a in _as_list(s["Action"]))]
    assert s3_statements
    for s in s3_statements:
        assert s["Effect"] == "Allow"
        assert not any(a in ("s3:*", "*") for a in _as_list(s["Action"])), s
        for resource in _as_list(s["Resource"]):
            # Only the bucket's ARN or ARN/* - never a wildcard over other buckets.
            assert resource == {"Fn::GetAtt": [bucket_name, "Arn"]} or resource == {"Fn::Sub": f"${{{bucket_name}.Arn}}/*"}, s

    for name, role in roles.items():
        trust = _statements(role["Properties"]["AssumeRolePolicyDocument"])
        assert [s["Principal"] for s in trust] == [{"Service": "ec2.amazonaws.com"}], name
        assert {"Ref": next(iter(managed))} in role["Properties"]["ManagedPolicyArns"], name
    profiles = _resources(template, "AWS::IAM::InstanceProfile")
    assert sorted(r["Ref"] for p in profiles.values() for r in p["Properties"]["Roles"]) == sorted(roles)


def test_head_may_pass_only_the_worker_role_and_end_only_its_cluster(template):
    head = template["Resources"]["RayHeadRole"]["Properties"]
    statements = [s for p in head["Policies"] for s in _statements(p["PolicyDocument"])]
    assert not any(s["Action"] in ("*", "ec2:*", "iam:*") for s in statements)
    (pass_role,) = [s for s in statements if s["Action"] == "iam:PassRole"]
    assert pass_role["Resource"] == {"Fn::GetAtt": ["RayWorkerRole", "Arn"]}
    for s in statements:
        actions = set(_as_list(s["Action"]))
        if actions & {"ec2:TerminateInstances", "ec2:StopInstances"}:
            assert s["Condition"]["StringEquals"]["ec2:ResourceTag/ray-cluster-name"] == {"Ref": "ClusterName"}
        if "ec2:RunInstances" in actions and "instance/*" in str(s["Resource"]):
            assert s["Condition"]["StringEquals"]["aws:RequestTag/ray-cluster-name"] == {"Ref": "ClusterName"}


def _head_statements(template) -> list[dict]:
    head = template["Resources"]["RayHeadRole"]["Properties"]
    return [s for p in head["Policies"] for s in _statements(p["PolicyDocument"])]


def _resource_kinds(statement) -> set[str]:
    """instance, image, subnet ... : the EC2 resource types an ARN pattern of the statement covers."""
    kinds = set()
    for resource in _as_list(statement["Resource"]):
        arn = resource["Fn::Sub"] if isinstance(resource, dict) else resource
        kinds.add(arn.rsplit(":", 1)[1].split("/", 1)[0])
    return kinds


def test_head_launches_only_the_instance_types_of_aws_yaml_from_amazons_images(template):
    """RunInstances authorizes each resource of the launch separately: the instance must match a statement that
    limits its type to cluster/aws.yaml's, the AMI one that limits its owner to Amazon."""
    cluster = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())
    types = sorted({t["node_config"]["InstanceType"] for t in cluster["available_node_types"].values()})
    run = [s for s in _head_statements(template) if "ec2:RunInstances" in _as_list(s["Action"])]
    assert all(s["Effect"] == "Allow" for s in run)
    for kind, key in (("instance", "ec2:InstanceType"), ("image", "ec2:Owner")):
        covering = [s for s in run if kind in _resource_kinds(s)]
        assert covering, kind
        for s in covering:
            assert _resource_kinds(s) == {kind}, f"{s['Sid']}: {kind} ARNs alone, so that its condition applies"
            assert key in s.get("Condition", {}).get("StringEquals", {}), s["Sid"]
    (instance,) = [s for s in run if "instance" in _resource_kinds(s)]
    assert sorted(_as_list(instance["Condition"]["StringEquals"]["ec2:InstanceType"])) == types
    (image,) = [s for s in run if "image" in _resource_kinds(s)]
    assert "amazon" in _as_list(image["Condition"]["StringEquals"]["ec2:Owner"])
    # The AMI of every node type is Amazon's own Deep Learning AMI (an SSM public parameter of AWS).
    for name, t in cluster["available_node_types"].items():
        assert t["node_config"]["ImageId"].startswith("resolve:ssm:/aws/service/deeplearning/"), name


def test_head_may_not_stop_or_start_instances(template):
    """Ray's AWS node provider stops and restarts nodes only with cache_stopped_nodes (default True;
    ray/autoscaler/_private/aws/node_provider.py create_node and terminate_nodes): cluster/aws.yaml turns it off."""
    from ray.autoscaler._private.util import prepare_config

    cluster = prepare_config(yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text()))
    assert cluster["provider"]["cache_stopped_nodes"] is False
    actions = {a for s in _head_statements(template) for a in _as_list(s["Action"])}
    assert "ec2:TerminateInstances" in actions
    assert not actions & {"ec2:StopInstances", "ec2:StartInstances"}, actions


def test_cluster_yaml_uses_these_profiles_and_cluster_name(template):
    cluster = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())
    cluster_name = template["Parameters"]["ClusterName"]["Default"]
    assert cluster["cluster_name"] == cluster_name
    names = {name: p["Properties"]["InstanceProfileName"]["Fn::Sub"].replace("${ClusterName}", cluster_name)
             for name, p in _resources(template, "AWS::IAM::InstanceProfile").items()}
    for node_type, spec in cluster["available_node_types"].items():
        want = names["RayHeadInstanceProfile" if node_type == cluster["head_node_type"] else "RayWorkerInstanceProfile"]
        assert spec["node_config"]["IamInstanceProfile"] == {"Name": want}, node_type


def test_local_s3_serves_put_and_get(monkeypatch):
    import boto3

    proc = subprocess.Popen([sys.executable, str(ROOT / "infra" / "local-s3" / "run.py"), "--port", "0",
                             "--bucket", "pfsr-local-test"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        env = {}
        for line in proc.stdout:
            if line.startswith("# ready"):
                break
            assert line.startswith("export "), line
            (key_value,) = shlex.split(line[len("export "):])
            key, value = key_value.split("=", 1)
            env[key] = value
        else:
            pytest.fail(f"local-s3 exited with {proc.wait()} before it was ready")
        assert env["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")

        # A client configured by the printed environment alone, as in a shell that sourced it.
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        s3 = boto3.session.Session().client("s3")
        body = os.urandom(1 << 16)
        s3.put_object(Bucket="pfsr-local-test", Key="shards/train-000000.tar", Body=body)
        assert s3.get_object(Bucket="pfsr-local-test", Key="shards/train-000000.tar")["Body"].read() == body
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
    assert rc == 0
