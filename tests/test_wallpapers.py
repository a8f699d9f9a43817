"""scripts/fetch_wallpapers.py without the network: the picture grouping, the licence of each picture from
debian/copyright (DEP-5 and gnome-backgrounds' free-form file, excerpts of the real files), and the selection of
one unpacked package tree."""
from __future__ import annotations

import csv
import json

import numpy as np
from PIL import Image

from scripts import fetch_wallpapers as fw

# Excerpts of the packages' real usr/share/doc/<package>/copyright (lomiri-wallpapers 20.04.0-2, gnome-backgrounds
# 43.1-1).
LOMIRI = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: lomiri-wallpapers

Files: warty-final-ubuntu.png
Copyright: 2004, Nathaniel McCallum <npmccallum@gentoo.org>
           2006, Daniel Holbach <daniel.holbach@ubuntu.com>
License: CC-BY-SA-3.0

Files: 16.04/seeding_by_Clements_Engelhardt.jpg
Copyright: Clemens Engelhardt, 2018
License: CC0-1.0

Files: 20.04/Fossa_by_Jasper_Roks.jpg
Copyright: 2023, Jasper Roks
License: CC-BY-SA-3.0

Files: debian/*
 AUTHORS
 20.04/.placeholder
Copyright: 2018, Dalton Durst
License: Expat

License: Expat
 Permission is hereby granted, free of charge, ...
"""
GNOME = """This package was debianized by Sebastien Bacher <seb128@debian.org> on

Copyright:
    Copyright \u00a9 2016 Helena Barto\u0161ov\u00e1
    Copyright \u00a9 2011 Jakub Steiner <jimmac@gmail.com>

Image Authors:

 - adwaita*
 - Chmiri.jpg:
   Copyright \u00a9 2011 Jakub Steiner <jimmac@gmail.com>
   Licensed under Creative Commons Attribution-ShareAlike 3.0 License.

 - Stones.jpg:
   Copyright \u00a9 2011 Felix Leupold
   Licensed under Creative Commons Attribution 2.0 License.

Licenses:

   This package is free software; you can redistribute it and/or modify
   it under the terms of the GNU General Public License as published by
"""
KDE = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/

Files: *
Copyright: 2014 KDE Visual Design Group http://vdesign.kde.org/
License: GPL-2+

Files: debian/*
Copyright: 2014, Scarlett Clark
License: GPL-2+
"""


def test_one_picture_in_several_resolutions_has_one_key():
    plasma = "usr/share/wallpapers/Kay/contents/images/{}.png"
    assert fw.picture_key(plasma.format("5120x2880")) == fw.picture_key(plasma.format("1080x1920"))
    assert fw.picture_key(plasma.format("5120x2880")) != fw.picture_key(plasma.replace("images/", "images_dark/")
                                                                        .format("5120x2880"))
    sway = "usr/share/backgrounds/sway/Sway_Wallpaper_Blue_{}.png"
    assert len({fw.picture_key(sway.format(r)) for r in ("2048x1536", "1136x640_Portrait", "768x1024")}) == 1
    gnome = "usr/share/backgrounds/gnome/{}.webp"
    assert fw.picture_key(gnome.format("adwaita-d")) != fw.picture_key(gnome.format("adwaita-l"))
    assert fw.output_name("p", "usr/share/wallpapers/Kay/contents/images_dark/5120x2880.png") == "Kay-dark.png"


def test_licence_of_each_picture():
    paragraphs, default = fw.parse_copyright(LOMIRI)
    fossa = fw.licence_of("usr/share/backgrounds/Fossa_by_Jasper_Roks.jpg", paragraphs, default)
    assert (fossa.licence, fossa.copyright) == ("CC-BY-SA-3.0", "2023, Jasper Roks")
    assert fossa.source == "Files: 20.04/Fossa_by_Jasper_Roks.jpg"
    assert fw.licence_of("usr/share/backgrounds/seeding_by_Clements_Engelhardt.jpg", paragraphs,
                         default).licence == "CC0-1.0"
    # a picture no paragraph lists: never the packaging's debian/* paragraph
    unlisted = fw.licence_of("usr/share/backgrounds/new.jpg", paragraphs, default)
    assert unlisted.licence == "(not stated)" and unlisted.source == "not listed (no Files: *)"

    paragraphs, default = fw.parse_copyright(KDE)
    assert fw.licence_of("usr/share/wallpapers/Kay/contents/images/5120x2880.png", paragraphs,
                         default).copyright == "2014 KDE Visual Design Group http://vdesign.kde.org/"

    paragraphs, default = fw.parse_copyright(GNOME)
    adwaita = fw.licence_of("usr/share/backgrounds/gnome/adwaita-d.webp", paragraphs, default)
    assert (adwaita.licence, adwaita.copyright) == ("CC-BY-SA-3.0", "2011 Jakub Steiner <jimmac@gmail.com>")
    assert fw.licence_of("x/Stones.jpg", paragraphs, default).licence == "CC-BY-2.0"
    grid = fw.licence_of("usr/share/backgrounds/gnome/grid-d.webp", paragraphs, default)
    assert grid.licence == "GPL-2+" and grid.copyright == ("2016 Helena Barto\u0161ov\u00e1; 2011 Jakub Steiner "
                                                           "<jimmac@gmail.com>")


def _png(path, w, h, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def test_collect_keeps_the_largest_version_with_its_licence(tmp_path):
    root = tmp_path / "pkg"
    (root / "usr/share/doc/plasma-workspace-wallpapers").mkdir(parents=True)
    (root / "usr/share/doc/plasma-workspace-wallpapers/copyright").write_text(KDE)
    theme = root / "usr/share/wallpapers/Kay"
    (theme / "metadata.json").parent.mkdir(parents=True)
    (theme / "metadata.json").write_text(json.dumps({"KPlugin": {"License": "CC-BY-SA-4.0",
                                                                 "Authors": [{"Name": "ruvkr"}]}}))
    _png(theme / "contents/images/300x200.png", 300, 200, 0)
    _png(theme / "contents/images/150x100.png", 150, 100, 1)
    (theme / "contents/images/900x600.png").symlink_to("300x200.png")  # another name, not another size
    _png(theme / "contents/images_dark/240x160.png", 240, 160, 2)
    _png(theme / "contents/screenshot.png", 60, 40, 3)

    rows = fw.collect("plasma-workspace-wallpapers", "4:5.27.5-2", root, tmp_path / "images", max_side=None)
    assert [(r["image"], r["width"], r["height"], r["other_resolutions"]) for r in rows] == [
        ("plasma-workspace-wallpapers/Kay.png", 300, 200, "150x100"),
        ("plasma-workspace-wallpapers/Kay-dark.png", 240, 160, "")]
    assert rows[0]["licence"] == "GPL-2+" and rows[0]["upstream_licence"] == "CC-BY-SA-4.0"
    assert rows[0]["upstream_author"] == "ruvkr" and rows[0]["file"].endswith("images/300x200.png")
    assert (tmp_path / "images/plasma-workspace-wallpapers/Kay.png").read_bytes() == \
        (theme / "contents/images/300x200.png").read_bytes()

    # scaled down to --max-side (Lanczos), and filtered by licence
    rows = fw.collect("plasma-workspace-wallpapers", "v", root, tmp_path / "small", max_side=120,
                      licences={"CC-BY-SA-4.0"})
    assert [(r["width"], r["height"]) for r in rows] == [(120, 80), (120, 80)]
    with Image.open(tmp_path / "small/plasma-workspace-wallpapers/Kay.png") as im:
        assert im.size == (120, 80)
    assert fw.collect("plasma-workspace-wallpapers", "v", root, tmp_path / "none", None, {"CC0-1.0"}) == []
    with open(tmp_path / "t.csv", "w", newline="") as f:  # every row fits the table's columns
        csv.DictWriter(f, fw.COLUMNS).writerows(rows)
