"""Package this checkout for the runtime_env of the Serve application (cluster/serve.yaml), as `ray job submit
--runtime-env cluster/runtime_env.yaml --working-dir .` packages it for a job: Ray's own packaging, with the
.gitignore and the `excludes` of cluster/runtime_env.yaml. From the repository root:

    CODE=$(python cluster/package_code.py /tmp/pfsr-code) && aws s3 sync /tmp/pfsr-code/ s3://$BUCKET/code/

writes OUT/<CODE>/working_dir.zip (the checkout) and OUT/<CODE>/py_modules.zip (platform/pfsr) and prints CODE, the
content hash Ray gives this working_dir. A Serve config accepts only remote URIs there (`serve deploy` uploads
nothing), and a node caches a remote package by its URI, so new code must get a new name: the hash.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKING_DIR_ZIP = "working_dir.zip"
PY_MODULES_ZIP = "py_modules.zip"


def package(out: Path) -> str:
    """Write the two archives under out/<hash>/ and return the hash."""
    from ray._private.runtime_env.packaging import create_package, get_uri_for_directory

    excludes = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())["excludes"]
    # gcs://_ray_pkg_<hash>.zip, the name `ray job submit --working-dir .` uploads this checkout under.
    uri = get_uri_for_directory(str(ROOT), include_gitignore=True, excludes=excludes)
    code = uri.rsplit("_ray_pkg_", 1)[1].removesuffix(".zip")
    target = out / code
    target.mkdir(parents=True, exist_ok=True)
    # A node unpacks a remote zip whose entries share one top-level folder into that folder's contents, so the
    # checkout (many top-level entries) stays as it is and platform/pfsr/... becomes pfsr/... on PYTHONPATH.
    create_package(str(ROOT), target / WORKING_DIR_ZIP, include_gitignore=True, excludes=excludes)
    # Ray reads .gitignore files only inside the folder it packs: the root's patterns (__pycache__, *.egg-info)
    # go in as excludes.
    ignored = [line.strip() for line in (ROOT / ".gitignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    create_package(str(ROOT / "platform"), target / PY_MODULES_ZIP, include_gitignore=True,
                   include_parent_dir=True, excludes=[*excludes, *ignored])
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write <hash>/working_dir.zip and <hash>/py_modules.zip in")
    args = parser.parse_args(argv)
    print(package(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
