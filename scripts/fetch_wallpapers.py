"""The training corpus of the shipped model: the pictures of six Debian wallpaper packages, with a licence table,
sharded by `pfsr prep`.

    python scripts/fetch_wallpapers.py --out data/wallpapers

1. `apt-get download` of PACKAGES (no install; about 180 MB) into OUT/debs (a .deb already there is reused),
   each unpacked with `dpkg-deb -x` into OUT/extracted/<package>.
2. The raster pictures (PNG, JPEG, WebP; not SVG, not the plasma previews `screenshot.*`), grouped into
   pictures: the same name apart from a resolution (`5120x2880`, `_1920x1080`) and `_Portrait` in the same folder
   is one picture in several resolutions, of which the largest (pixels) is kept -> OUT/images/<package>/<name>.
   Dark and light variants (`images_dark/`, `-d`/`-l`) are different pictures and both kept.
3. OUT/licences.csv, one row per kept picture: package, version, file (in the package), licence and copyright
   holder from the package's debian/copyright (usr/share/doc/<package>/copyright in the .deb; the last
   paragraph whose `Files:` matches, DEP-5's rule), and where the package says more per picture (the plasma
   wallpapers' metadata.json), its licence and author as upstream_licence, upstream_author.
4. `pfsr prep` of OUT/images -> OUT/shards/train, and the held-back photos (scikit-image's chelsea and coffee,
   never in the corpus) as whole images -> OUT/val (a folder for --val-images: figures are on whole photos).

--max-side N (default 2048, DIV2K's size; 0 keeps the originals) scales larger pictures down (Lanczos) to that
longer side and writes them as PNG: the wallpapers go up to 6028x3391 (828 megapixels in all), many of them JPEG,
whose artefacts the downscaling also removes. For a GPU machine that takes at most 64 MiB along, --max-side 1024
--format webp (see the README for the sizes).
The outputs are a function of the packages' versions and the options; a step whose output exists is skipped
(delete OUT/images to rebuild it, OUT/shards to re-shard).
"""
from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("plasma-workspace-wallpapers", "gnome-backgrounds", "ukui-wallpapers", "sway-backgrounds",
            "lomiri-wallpapers-20.04", "lomiri-wallpapers-16.04")
RASTER = {".png", ".jpg", ".jpeg", ".webp"}
RESOLUTION = re.compile(r"_?\d{3,5}x\d{3,5}")
HELD_BACK = ("chelsea", "coffee")  # scikit-image's photos that every figure is measured on
COLUMNS = ("image", "package", "version", "file", "width", "height", "licence", "copyright", "copyright_source",
           "upstream_licence", "upstream_author", "other_resolutions")


@dataclass
class Paragraph:
    """One `Files:` paragraph of a DEP-5 (or free-form, see parse_copyright) debian/copyright file."""

    patterns: list[str]
    copyright: str
    licence: str
    source: str = ""  # where in the file: "Files: <patterns>", or the package-wide default

    def __post_init__(self):
        self.source = self.source or "Files: " + " ".join(self.patterns)


def run(argv: list[str], **kwargs) -> None:
    print("$ " + " ".join(argv), flush=True)
    subprocess.run(argv, check=True, **kwargs)


def download(packages: tuple[str, ...], debs: Path) -> dict[str, Path]:
    """package -> its .deb under `debs` (downloaded unless one is there)."""
    debs.mkdir(parents=True, exist_ok=True)
    found = {p: next(iter(sorted(debs.glob(f"{p}_*.deb"))), None) for p in packages}
    missing = [p for p, deb in found.items() if deb is None]
    if missing:
        if not shutil.which("apt-get"):
            sys.exit(f"error: apt-get not found; put {', '.join(missing)} (.deb) into {debs} by hand")
        try:
            run(["apt-get", "download", *missing], cwd=debs)
        except subprocess.CalledProcessError:
            sys.exit("error: `apt-get download` failed: run `apt-get update` (as root) and try again")
        found = {p: next(iter(sorted(debs.glob(f"{p}_*.deb")))) for p in packages}
    return found


def deb_version(deb: Path) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True,
                          text=True).stdout.strip()


def parse_copyright(text: str) -> tuple[list[Paragraph], Paragraph]:
    """debian/copyright -> (Files: paragraphs in file order, the package default).

    DEP-5 files give `Files:` paragraphs; the first one with `*` (or, without one, the header's Copyright) is the
    default. gnome-backgrounds' file is free-form: its "Image Authors:" list (`- name:` lines, then Copyright ©
    and "Licensed under ..." lines) is read into paragraphs, its "Copyright:" block and the GPL-2+ of its
    "Licenses:" section are the default."""
    if text.lstrip().startswith("Format:"):
        paragraphs = []
        header: dict[str, str] = {}
        for block in re.split(r"\n\s*\n", text.strip()):
            fields: dict[str, str] = {}
            key = None
            for line in block.splitlines():
                if line[:1] in (" ", "\t") and key:
                    fields[key] += "\n" + line.strip()
                elif ":" in line:
                    key, _, value = line.partition(":")
                    fields[key] = value.strip()
            if "Files" in fields:
                paragraphs.append(Paragraph(fields["Files"].split(), " ".join(fields.get("Copyright", "").split()),
                                            fields.get("License", "").splitlines()[0].strip()))
            elif "Format" in fields:
                header = fields
        default = next((p for p in paragraphs if "*" in p.patterns),
                       Paragraph(["*"], header.get("Copyright", "") or "(not stated)",
                                 header.get("License", "") or "(not stated)", "not listed (no Files: *)"))
        return paragraphs, default
    # free-form (gnome-backgrounds)
    holders = re.search(r"^Copyright:\n((?:[ \t]+.*\n)+)", text, re.M)
    default = Paragraph(["*"], "; ".join(" ".join(line.replace("Copyright ©", "").split())
                                        for line in holders.group(1).splitlines()) if holders else "(not stated)",
                        "GPL-2+" if "GNU General Public License" in text else "(not stated)",
                        "not listed: the package's Copyright: and Licenses:")
    paragraphs: list[Paragraph] = []
    authors = text.split("Image Authors:", 1)[1].split("\nLicenses:", 1)[0] if "Image Authors:" in text else ""
    names: list[str] = []
    rights: list[str] = []
    for line in authors.splitlines():
        line = line.strip()
        if line.startswith("- "):
            if rights:  # a new group starts
                names, rights = [], []
            names.append(line[2:].rstrip(":").strip())
        elif line.startswith("Copyright"):
            rights.append(line.replace("Copyright ©", "").strip())
        elif line.startswith("Licensed under"):
            paragraphs.append(Paragraph(list(names), "; ".join(rights), spdx(line),
                                        "Image Authors: " + " ".join(names)))
    return paragraphs, default


def spdx(sentence: str) -> str:
    """'Licensed under Creative Commons Attribution-ShareAlike 3.0 License.' -> 'CC-BY-SA-3.0'."""
    m = re.search(r"Attribution(-ShareAlike)? (\d\.\d)", sentence)
    return f"CC-BY{'-SA' if m.group(1) else ''}-{m.group(2)}" if m else sentence.strip(" .")


def licence_of(path: str, paragraphs: list[Paragraph], default: Paragraph) -> Paragraph:
    """The last paragraph whose pattern matches the installed file (DEP-5: the last match wins). Patterns name the
    upstream tree (`16.04/Fossa.jpg`, `adwaita*`): a pattern without wildcards in its last part matches by file
    name, one with wildcards by fnmatch on the path; `debian/*` is about the packaging, never a picture."""
    name = path.rsplit("/", 1)[-1]
    found = default
    for paragraph in paragraphs:
        for pattern in paragraph.patterns:
            if pattern.startswith("debian/"):
                continue
            last = pattern.rsplit("/", 1)[-1]
            if any(c in last for c in "*?["):
                hit = fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(name, last)
            else:
                hit = name == last
            if hit:
                found = paragraph
    return found


def upstream_metadata(root: Path, rel: str) -> tuple[str, str]:
    """(licence, author) of a plasma wallpaper from its metadata.json/.desktop; ('', '') elsewhere."""
    parts = rel.split("/")
    if "wallpapers" not in parts[:-1] or "contents" not in parts:
        return "", ""
    theme = root.joinpath(*parts[:parts.index("contents")])
    if (theme / "metadata.json").is_file():
        plugin = json.loads((theme / "metadata.json").read_text()).get("KPlugin", {})
        return plugin.get("License", ""), ", ".join(a.get("Name", "") for a in plugin.get("Authors", []))
    if (theme / "metadata.desktop").is_file():
        fields = dict(line.split("=", 1) for line in (theme / "metadata.desktop").read_text().splitlines()
                      if "=" in line)
        return fields.get("X-KDE-PluginInfo-License", ""), fields.get("X-KDE-PluginInfo-Author", "")
    return "", ""


def picture_key(rel: str) -> str:
    """Files of one picture in several resolutions share this key: the folder and the name without resolution,
    `_Portrait` and suffix."""
    folder, _, name = rel.rpartition("/")
    stem = RESOLUTION.sub("", Path(name).stem).replace("_Portrait", "")
    return f"{folder}/{stem}"


def output_name(package: str, rel: str) -> str:
    """A readable, unique file name: plasma's `<Theme>/contents/images_dark/5120x2880.png` -> `Theme-dark.png`."""
    parts = rel.split("/")
    if "contents" in parts:
        theme = parts[parts.index("contents") - 1]
        return f"{theme}{'-dark' if 'images_dark' in parts else ''}{Path(rel).suffix}"
    return RESOLUTION.sub("", Path(rel).stem).replace("_Portrait", "") + Path(rel).suffix


def collect(package: str, version: str, root: Path, images_dir: Path, max_side: int | None,
            licences: set[str] | None = None) -> list[dict]:
    """Keep the largest file of each picture of one extracted package -> images_dir/<package>/; its table rows.
    With `licences`, only pictures whose licence (the upstream one where the package gives it) is in the set."""
    from PIL import Image

    copyright_file = root / "usr" / "share" / "doc" / package / "copyright"
    paragraphs, default = parse_copyright(copyright_file.read_text(errors="replace"))
    groups: dict[str, list[tuple[int, str, tuple[int, int]]]] = defaultdict(list)
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        # symlinks are other names of a file (plasma's 800x600.jpg -> 2560x1600.jpg), previews are thumbnails
        if path.is_symlink() or not path.is_file() or path.suffix.lower() not in RASTER or path.stem == "screenshot":
            continue
        with Image.open(path) as im:
            groups[picture_key(rel)].append((im.width * im.height, im.width >= im.height, rel, im.size))
    rows = []
    for _, files in sorted(groups.items()):
        files.sort(reverse=True)  # the most pixels; of equal ones the landscape version
        _, _, rel, (w, h) = files[0]
        paragraph = licence_of(rel, paragraphs, default)
        up_licence, up_author = upstream_metadata(root, rel)
        if licences is not None and (up_licence or paragraph.licence) not in licences:
            continue
        name = output_name(package, rel)
        target = images_dir / package / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if max_side and max(w, h) > max_side:
            with Image.open(root / rel) as im:
                f = max_side / max(w, h)
                im = im.convert("RGB").resize((round(w * f), round(h * f)), Image.Resampling.LANCZOS)
                target = target.with_suffix(".png")
                im.save(target)
                w, h = im.size
        else:
            shutil.copyfile(root / rel, target)
        rows.append({"image": f"{package}/{target.name}", "package": package, "version": version, "file": "/" + rel,
                     "width": w, "height": h, "licence": paragraph.licence, "copyright": paragraph.copyright,
                     "upstream_licence": up_licence, "upstream_author": up_author,
                     "copyright_source": paragraph.source,
                     "other_resolutions": " ".join(f"{s[0]}x{s[1]}" for *_, s in files[1:])})
    return rows


def write_held_back(val_dir: Path) -> None:
    """chelsea and coffee from scikit-image, whole, as PNG."""
    from PIL import Image
    from skimage import data

    val_dir.mkdir(parents=True, exist_ok=True)
    for name in HELD_BACK:
        Image.fromarray(getattr(data, name)()).save(val_dir / f"{name}.png")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("data/wallpapers"))
    ap.add_argument("--max-side", type=int, default=2048,
                    help="scale larger pictures down to this longer side (pixels; 0: keep them as they are)")
    ap.add_argument("--licences", default=None,
                    help="keep only pictures under these licences (comma-separated, as in licences.csv: the "
                         "upstream licence where given, else Debian's); default: all")
    ap.add_argument("--patch", type=int, default=480, help="`pfsr prep --patch`")
    ap.add_argument("--step", type=int, default=480, help="`pfsr prep --step` (= --patch: sub-images do not overlap)")
    ap.add_argument("--format", default="png", choices=["png", "webp"], help="`pfsr prep --format`")
    ap.add_argument("--min-shards", type=int, default=8, help="`pfsr prep --min-shards`")
    ap.add_argument("--no-prep", action="store_true", help="stop after the images and the licence table")
    ap.add_argument("--ray-address", default=None)
    args = ap.parse_args(argv)
    out = args.out.resolve()

    images_dir = out / "images"
    recipe = {"packages": list(PACKAGES), "max_side": args.max_side or None,
              "licences": sorted(args.licences.split(",")) if args.licences else None}
    if images_dir.is_dir() and json.loads((out / "recipe.json").read_text()) != recipe:
        sys.exit(f"error: {images_dir} was made with other options ({(out / 'recipe.json').read_text().strip()}): "
                 "use another --out, or delete its images/ and shards/")
    if not images_dir.is_dir():
        debs = download(PACKAGES, out / "debs")
        partial = out / "images.partial"
        shutil.rmtree(partial, ignore_errors=True)
        rows = []
        for package, deb in debs.items():
            root = out / "extracted" / package
            if not root.is_dir():  # unpacked completely, or not there
                partial_root = root.with_name(root.name + ".partial")
                shutil.rmtree(partial_root, ignore_errors=True)
                partial_root.mkdir(parents=True)
                run(["dpkg-deb", "-x", str(deb), str(partial_root)])
                partial_root.rename(root)
            rows += collect(package, deb_version(deb), root, partial, args.max_side,
                            set(recipe["licences"]) if recipe["licences"] else None)
        with open(partial / "licences.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        (partial / "licences.csv").replace(out / "licences.csv")
        (out / "recipe.json").write_text(json.dumps(recipe) + "\n")
        partial.rename(images_dir)  # complete, or not there
    rows = list(csv.DictReader(open(out / "licences.csv")))
    by_licence: dict[str, int] = defaultdict(int)
    for row in rows:
        by_licence[row["upstream_licence"] or row["licence"]] += 1
    megapixels = sum(int(r["width"]) * int(r["height"]) for r in rows) / 1e6
    print(f"{len(rows)} pictures, {megapixels:.0f} megapixels, in {images_dir}; licences (upstream where given): "
          + ", ".join(f"{k} {v}" for k, v in sorted(by_licence.items())), flush=True)
    if not (out / "val").is_dir():
        write_held_back(out / "val")
    if args.no_prep or (out / "shards" / "train" / "dataset.json").is_file():
        return 0
    run([sys.executable, "-m", "pfsr", "prep", "--source", str(images_dir), "--out", str(out / "shards" / "train"),
         "--layout", "folder", "--split", "train", "--patch", str(args.patch), "--step", str(args.step),
         "--format", args.format, "--min-shards", str(args.min_shards),
         *(["--ray-address", args.ray_address] if args.ray_address else [])])
    return 0


if __name__ == "__main__":
    sys.exit(main())
