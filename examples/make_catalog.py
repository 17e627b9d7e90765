"""Synthetic multimodal product catalog whose text and image are *complementary*.

``make_catalog(out_dir)`` writes ``out_dir/catalog.csv`` (``id,title,description,image,label``)
and one PNG photo per item under ``out_dir/images/``. Everything is drawn from ``seed``: the same
arguments give byte-identical files. Only numpy, Pillow and the standard library are used.

Why it exists: a fusion head can only beat both unimodal heads when the modalities fail on
*different* items. HANet's error analysis of a real catalog (Chen et al.) found both right on
63%, only text right on 20%, only image right on 4%. This generator makes that structure explicit
and tunable, so the demo shows a real fusion gain on a dataset that builds in seconds.

Generative model
----------------
Classes form a grid: ``family x variant`` (3 variants per family, up to 12 families; class ``k``
is family ``k // 3``, variant ``k % 3``), labelled like ``"kitchen/kettle"``.

* **Text identifies the family, not always the variant.** The title is
  ``[brand] [colour] [material] <noun> [size] [extra]`` in a few orders and casings. Brands,
  materials, sizes, description sentences and bullet features all come from per-family lists
  that are identical across a family's variants, so only the noun can tell the variant apart.
  The noun is a *decisive* synonym of the variant ("kettle", "whistling kettle") when the text is
  clear. When the text is weak it is instead (a) a word shared by two or three variants ("pot"
  = kettle or teapot; some such words, "pot", "lamp", "cup", are also used by other families),
  (b) the family's generic noun ("hot drinks maker"), or (c) a generic title with no product
  word at all ("Best Seller - Red") and no description.
* **The image identifies the variant, not always the family.** The object's shape is set by the
  variant index (0: round body with handle, 1: box with a band, 2: tall bottle with neck), so
  e.g. every variant-0 class has the same silhouette, and so is its pattern (solid / stripes /
  dots; a random pattern 25% of the time). Object colours come from a palette shared by a *pair*
  of families (families 2j and 2j+1; 10% of items get a colour from another palette). What
  separates the two families of a pair is the scene: a clear photo is a "lifestyle" shot whose
  background (colour + texture: tiles, wood, grass, bricks...) belongs to the family. A weak photo
  is either a studio shot on a plain light background (family known up to the pair) or
  uninformative: a "no image" placeholder or a washed-out, tiny object.
* **Per-item modes** (probabilities in ``MODE_PROBS``): both clear, text weak, image weak, both
  weak. Weak text is split by ``TEXT_WEAK_KINDS``, weak images by ``IMAGE_WEAK_KINDS``. Since
  the weak modes are mostly disjoint, at least one modality identifies the class on about
  ``1 - P(both weak)`` of the items, while each modality alone is wrong on roughly half of its
  own weak items.
* **Descriptions** are missing for about a third of the items (``P_NO_DESCRIPTION``: an empty
  field, or an empty tag such as ``<p></p>``), always missing with a generic title, otherwise a
  little HTML (``<p>``, ``<b>``, ``<ul><li>``). A clear description may repeat the decisive noun;
  a weak one only uses the title's noun or the family's generic noun, never narrowing it down.
* **Nuisance**: random object position, scale (45-75% of the image), rotation (+-35 degrees),
  1-3 clutter props, brightness jitter and Gaussian pixel noise.

Measured with the demo's frozen encoders (all-MiniLM-L6-v2 mean-pooled over title + HTML-stripped
description; ImageNet tf_efficientnet_lite0 average-pooled at 224 px, timm's mean/std) and a
5-fold cross-validated logistic regression on standardised features, 24 classes:

=========  =====  =====  ======  =============  ==========  ===========  ==========
n, seed    text   image  oracle  concat (both)  both right  only text    only image
=========  =====  =====  ======  =============  ==========  ===========  ==========
2000, 0    0.793  0.733  0.964   0.954          0.562       0.231        0.170
2000, 1    0.790  0.715  0.959   0.950          0.546       0.244        0.169
600, 0     0.743  0.665  0.920   0.878          0.488       0.255        0.177
600, 2     0.763  0.697  0.950   0.895          0.510       0.253        0.187
=========  =====  =====  ======  =============  ==========  ===========  ==========

(oracle = either unimodal model right, the upper bound for fusion). Both models get the family
right far more often than the class: text 0.96, image 0.74-0.77 at n=2000.

Harder mode (``harder=True``, ``--harder``): the sources disagree more, so a stack has work to
do. More items have one weak modality (``MODE_PROBS_HARDER``: 24% both clear, 33% text weak,
33% image weak, 10% both weak), and ``P_LABEL_NOISE_HARDER`` (8%) of the items carry the label
of another variant of their family (label noise a careful annotator could make: the text and
photo still show the drawn class). The label noise comes from its own seed stream; the default
mode's files are byte-identical to those written before the mode existed.

Run ``python examples/make_catalog.py --out DIR [--n 2000] [--seed 0] [--classes 24]
[--image-size 128] [--long-tail] [--harder] [--missing-image P] [--empty-text P]
[--images-per-item A-B]``.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from embedstore.catalog import IMAGE_SEP

__all__ = [
    "FAMILIES",
    "IMAGE_WEAK_KINDS",
    "MODE_PROBS",
    "MODE_PROBS_HARDER",
    "P_LABEL_NOISE_HARDER",
    "P_NO_DESCRIPTION",
    "TEXT_WEAK_KINDS",
    "Family",
    "LONG_TAIL_HEAD",
    "LONG_TAIL_RATIO",
    "class_labels",
    "class_sizes",
    "main",
    "make_catalog",
]

# Per-item joint mode of the two modalities (see the module docstring).
MODE_PROBS: dict[str, float] = {
    "both_clear": 0.40,
    "text_weak": 0.27,
    "image_weak": 0.27,
    "both_weak": 0.06,
}
# --harder: fewer items on which both modalities are clear, and label noise within a family.
MODE_PROBS_HARDER: dict[str, float] = {
    "both_clear": 0.24,
    "text_weak": 0.33,
    "image_weak": 0.33,
    "both_weak": 0.10,
}
P_LABEL_NOISE_HARDER = 0.08
# How weak text is weak: a noun shared by 2-3 variants, the family's generic noun only,
# or a generic title with no product word and no description.
TEXT_WEAK_KINDS: dict[str, float] = {"shared": 0.55, "family": 0.30, "generic": 0.15}
# How a weak photo is weak: studio shot (no scene), placeholder, washed-out tiny object.
IMAGE_WEAK_KINDS: dict[str, float] = {"studio": 0.75, "placeholder": 0.125, "washed": 0.125}
P_NO_DESCRIPTION = 0.30  # of the items without a generic title; ~1/3 of all items
P_OFF_PALETTE = 0.10  # object colour drawn from another pair's palette
P_RANDOM_PATTERN = 0.25  # pattern not tied to the variant

VARIANTS_PER_FAMILY = 3


@dataclass(frozen=True)
class Family:
    """One product family: its variants' decisive nouns and its variant-neutral vocabulary."""

    name: str
    generic: str  # family noun that fits every variant
    variants: tuple[tuple[str, tuple[str, ...]], ...]  # (label name, decisive nouns)
    shared: tuple[tuple[str, frozenset[int]], ...]  # (ambiguous noun, variants it fits)
    materials: tuple[str, ...]
    sizes: tuple[str, ...]
    uses: tuple[str, ...]
    features: tuple[str, ...]
    care: str


def _fam(name, generic, variants, shared, materials, sizes, uses, features, care) -> Family:
    return Family(
        name,
        generic,
        tuple((v, tuple(words)) for v, words in variants),
        tuple((w, frozenset(ix)) for w, ix in shared),
        tuple(materials),
        tuple(sizes),
        tuple(uses),
        tuple(features),
        care,
    )


# fmt: off
FAMILIES: tuple[Family, ...] = (
    _fam(
        "kitchen", "hot drinks maker",
        [("kettle", ["kettle", "electric kettle", "whistling kettle"]),
         ("teapot", ["teapot", "tea pot", "loose leaf teapot"]),
         ("coffee-press", ["french press", "cafetiere", "coffee press"])],
        [("pot", [0, 1]), ("brewer", [1, 2]), ("jug", [0, 2])],
        ["stainless steel", "glass", "ceramic", "enamel"],
        ["1 L", "1.2 L", "600 ml", "1.5 L"],
        ["your morning routine", "the kitchen counter", "slow weekend breakfasts"],
        ["Heat-resistant handle", "Dishwasher safe", "BPA free", "Drip-free pouring"],
        "Rinse with warm water and dry thoroughly.",
    ),
    _fam(
        "cookware", "cookware piece",
        [("frying-pan", ["frying pan", "skillet", "fry pan"]),
         ("saucepan", ["saucepan", "sauce pan", "milk pan"]),
         ("wok", ["wok", "stir fry wok", "carbon steel wok"])],
        [("pan", [0, 1, 2]), ("saute pan", [0, 2]), ("deep pan", [1, 2])],
        ["cast iron", "non-stick aluminium", "tri-ply", "hard anodised"],
        ["20 cm", "24 cm", "28 cm", "30 cm"],
        ["everyday cooking", "induction and gas hobs", "family dinners"],
        ["Oven safe to 220 C", "Induction compatible", "Stay-cool handle", "PFOA free"],
        "Hand wash recommended; season before first use.",
    ),
    _fam(
        "bath", "bath linen",
        [("towel", ["bath towel", "hand towel", "towel"]),
         ("bathrobe", ["bathrobe", "dressing gown", "robe"]),
         ("bath-mat", ["bath mat", "shower mat", "bath rug"])],
        [("wrap", [0, 1]), ("floor towel", [0, 2]), ("spa essential", [0, 1, 2])],
        ["cotton", "bamboo", "microfiber", "Egyptian cotton"],
        ["500 gsm", "600 gsm", "Set of 2", "Oversized"],
        ["a spa feeling at home", "the family bathroom", "guest rooms"],
        ["Quick drying", "Highly absorbent", "Machine washable", "Oeko-Tex certified"],
        "Machine wash at 40 C, tumble dry low.",
    ),
    _fam(
        "garden", "garden essential",
        [("watering-can", ["watering can", "sprinkling can"]),
         ("planter", ["planter", "flower pot", "plant pot"]),
         ("garden-hose", ["garden hose", "hose pipe", "hosepipe"])],
        [("pot", [1]), ("watering set", [0, 2]), ("outdoor accessory", [0, 1, 2])],
        ["plastic", "galvanised steel", "terracotta", "recycled rubber"],
        ["Large", "Medium", "Compact", "XL"],
        ["balcony gardens", "the vegetable patch", "indoor and outdoor plants"],
        ["UV resistant", "Frost proof", "Lightweight", "Weatherproof finish"],
        "Empty and store indoors over winter.",
    ),
    _fam(
        "office", "desk accessory",
        [("desk-lamp", ["desk lamp", "reading lamp", "task lamp"]),
         ("stapler", ["stapler", "staple gun", "heavy duty stapler"]),
         ("pen-holder", ["pen holder", "pencil cup", "pen pot"])],
        [("lamp", [0]), ("office tool", [1, 2]), ("cup", [2]), ("desk organiser", [1, 2])],
        ["metal", "bamboo", "ABS plastic", "walnut"],
        ["Compact", "Standard", "A4", "Pro"],
        ["the home office", "study desks", "busy workstations"],
        ["Non-slip base", "Minimal design", "Sturdy build", "2-year warranty"],
        "Wipe clean with a dry cloth.",
    ),
    _fam(
        "sport", "sports ball",
        [("football", ["football", "soccer ball"]),
         ("basketball", ["basketball", "hoops ball"]),
         ("volleyball", ["volleyball", "beach volleyball"])],
        [("ball", [0, 1, 2]), ("match ball", [0, 1]), ("size 5 ball", [0, 2])],
        ["PU leather", "rubber", "synthetic leather", "composite"],
        ["Official size", "Junior", "Pro", "Training"],
        ["club training", "the park", "indoor and outdoor play"],
        ["Butyl bladder", "Machine stitched", "Great grip", "Holds air longer"],
        "Store inflated, away from direct sunlight.",
    ),
    _fam(
        "bags", "bag",
        [("backpack", ["backpack", "rucksack", "daypack"]),
         ("handbag", ["handbag", "purse", "shoulder bag"]),
         ("suitcase", ["suitcase", "trolley case", "hard shell case"])],
        [("travel bag", [0, 2]), ("carry-on", [0, 2]), ("tote", [1]), ("everyday bag", [0, 1])],
        ["canvas", "vegan leather", "nylon", "recycled polyester"],
        ["20 L", "30 L", "Medium", "Large"],
        ["commuting", "weekend trips", "travel"],
        ["Padded compartment", "Water repellent", "YKK zips", "Hidden pocket"],
        "Spot clean only.",
    ),
    _fam(
        "lighting", "light",
        [("floor-lamp", ["floor lamp", "standing lamp", "arc lamp"]),
         ("pendant-light", ["pendant light", "ceiling pendant", "hanging lamp"]),
         ("wall-sconce", ["wall sconce", "wall light", "sconce"])],
        [("lamp", [0, 1]), ("light fixture", [1, 2]), ("LED light", [0, 1, 2])],
        ["brass", "matte metal", "rattan", "opal glass"],
        ["E27", "GU10", "Dimmable", "Warm white"],
        ["living rooms", "cosy corners", "bedrooms and hallways"],
        ["Dimmable", "Energy class A", "Bulb not included", "Easy installation"],
        "Switch off and dust with a soft cloth.",
    ),
    _fam(
        "footwear", "footwear",
        [("sneakers", ["sneakers", "trainers", "running shoes"]),
         ("boots", ["ankle boots", "chelsea boots", "boots"]),
         ("sandals", ["sandals", "flip flops", "slides"])],
        [("shoes", [0, 1, 2]), ("summer shoes", [0, 2]), ("casual shoes", [0, 1])],
        ["leather", "suede", "canvas", "mesh"],
        ["EU 38", "EU 42", "UK 7", "US 9"],
        ["everyday wear", "city walks", "the weekend"],
        ["Cushioned insole", "Rubber outsole", "True to size", "Vegan materials"],
        "Clean with a damp cloth; do not machine wash.",
    ),
    _fam(
        "tableware", "dinnerware",
        [("plate", ["dinner plate", "side plate", "plate"]),
         ("bowl", ["bowl", "cereal bowl", "soup bowl"]),
         ("mug", ["mug", "coffee mug", "tea cup"])],
        [("dish", [0, 1]), ("cup", [2]), ("pasta dish", [0, 1]), ("tableware", [0, 1, 2])],
        ["porcelain", "stoneware", "bone china", "melamine"],
        ["Set of 4", "Set of 6", "Single", "Set of 2"],
        ["everyday dining", "dinner parties", "the breakfast table"],
        ["Microwave safe", "Dishwasher safe", "Chip resistant", "Hand glazed"],
        "Dishwasher safe; avoid abrasive sponges.",
    ),
    _fam(
        "audio", "audio device",
        [("headphones", ["headphones", "over-ear headphones", "headset"]),
         ("earbuds", ["earbuds", "earphones", "in-ear buds"]),
         ("speaker", ["bluetooth speaker", "speaker", "soundbar"])],
        [("noise cancelling audio", [0, 1]), ("portable audio", [1, 2]),
         ("wireless audio", [0, 1, 2])],
        ["aluminium", "matte plastic", "fabric-covered", "recycled plastic"],
        ["Bluetooth 5.3", "30 h battery", "USB-C", "IPX4"],
        ["music on the go", "calls and podcasts", "home listening"],
        ["Deep bass", "Fast charging", "Multipoint pairing", "Voice assistant"],
        "Keep away from liquids; charge monthly.",
    ),
    _fam(
        "bedding", "bedding",
        [("pillow", ["pillow", "bed pillow", "cushion"]),
         ("duvet", ["duvet", "comforter", "duvet insert"]),
         ("blanket", ["throw blanket", "fleece throw", "blanket"])],
        [("quilt", [1, 2]), ("cosy filler", [0, 1]), ("sleep essential", [0, 1, 2])],
        ["cotton", "down alternative", "linen", "wool"],
        ["Single", "Double", "King", "Queen"],
        ["restful nights", "guest bedrooms", "chilly evenings"],
        ["Hypoallergenic", "Breathable", "Machine washable", "Responsibly sourced"],
        "Machine wash cold, tumble dry low.",
    ),
)

MAX_CLASSES = len(FAMILIES) * VARIANTS_PER_FAMILY

BRANDS = (
    "Aurora", "Nordvik", "Bellamy", "Kasai", "Oakhurst", "Lumen & Co", "Verdana Home",
    "Tessaro", "Brightline", "Halden", "Mirelli", "Quokka", "Sundberg", "Atlas Living",
    "Fennwick", "Orla", "Castell", "Pinewood", "Zephyr", "Marlowe", "Cobalt", "Ivy Lane",
    "Rostock", "Selva",
)
GENERIC_TITLES = (
    "New Arrival", "Best Seller", "Gift Idea", "Premium Quality Item", "Home Essentials",
    "Limited Edition", "Sale Item", "Must Have", "Customer Favourite", "Everyday Basics",
)
EXTRAS = ("Pack of 2", "2024 Edition", "Gift Set", "Free Delivery", "Best Seller", "New")

# Object colours: palette j is shared by families 2j and 2j+1.
PALETTES: tuple[tuple[tuple[str, tuple[int, int, int]], ...], ...] = (
    (("Red", (196, 38, 46)), ("Orange", (232, 120, 30))),
    (("Blue", (40, 80, 190)), ("Navy", (25, 35, 95))),
    (("Green", (45, 150, 70)), ("Olive", (110, 120, 40))),
    (("Black", (32, 32, 34)), ("Grey", (128, 128, 132))),
    (("Pink", (232, 120, 170)), ("Purple", (120, 50, 150))),
    (("Yellow", (236, 200, 40)), ("Brown", (120, 75, 40))),
)
# Lifestyle-shot scene per family: background colour and texture.
SCENES: tuple[tuple[tuple[int, int, int], str], ...] = (
    ((226, 214, 190), "tiles"),  # kitchen: beige tiles
    ((90, 60, 40), "wood"),  # cookware: dark wood hob-side
    ((170, 210, 225), "tiles"),  # bath: light blue tiles
    ((80, 140, 60), "grass"),  # garden: lawn
    ((185, 140, 90), "wood"),  # office: oak desk
    ((60, 120, 70), "stripes"),  # sport: pitch
    ((150, 60, 50), "bricks"),  # bags: brick street
    ((50, 50, 80), "gradient"),  # lighting: dusk room
    ((140, 130, 120), "speckle"),  # footwear: pavement
    ((235, 235, 220), "checks"),  # tableware: tablecloth
    ((40, 40, 45), "gradient"),  # audio: dark studio
    ((200, 170, 200), "speckle"),  # bedding: lilac linen
)
PATTERNS = ("solid", "stripes", "dots", "checks")
# fmt: on


def class_labels(n_classes: int = 24) -> list[str]:
    """The readable labels of the first ``n_classes`` classes, e.g. ``"kitchen/kettle"``."""
    _check_int("n_classes", n_classes, 2, MAX_CLASSES)
    out = []
    for k in range(n_classes):
        fam = FAMILIES[k // VARIANTS_PER_FAMILY]
        out.append(f"{fam.name}/{fam.variants[k % VARIANTS_PER_FAMILY][0]}")
    return out


LONG_TAIL_HEAD = 3  # classes with LONG_TAIL_RATIO x the items of the rest (--long-tail)
LONG_TAIL_RATIO = 10


def class_sizes(n: int, n_classes: int) -> np.ndarray:
    """Items per class in ``--long-tail`` mode: classes ``linspace(0, K, LONG_TAIL_HEAD)``
    (one per few families, e.g. 0, 8, 16 of 24) weigh ``LONG_TAIL_RATIO``, the others 1; ``n``
    split by largest remainder, every class keeping at least one item. Sums to ``n``."""
    head = np.linspace(0, n_classes, min(LONG_TAIL_HEAD, n_classes - 1), endpoint=False)
    w = np.ones(n_classes)
    w[head.astype(int)] = LONG_TAIL_RATIO
    exact = n * w / w.sum()
    sizes = np.maximum(1, np.floor(exact)).astype(np.int64)
    for k in np.argsort(-(exact - sizes), kind="stable")[: max(0, n - int(sizes.sum()))]:
        sizes[k] += 1
    while sizes.sum() > n:  # tiny n: the ones given to empty classes come from the largest
        sizes[np.argmax(sizes)] -= 1
    return sizes


def make_catalog(
    out_dir: str | Path,
    n: int = 2000,
    seed: int = 0,
    n_classes: int = 24,
    image_size: int = 128,
    long_tail: bool = False,
    harder: bool = False,
    first_id: int = 0,
    labelled: bool = True,
    missing_image: float = 0.0,
    empty_text: float = 0.0,
    images_per_item: tuple[int, int] = (1, 1),
) -> Path:
    """Write ``n`` items (csv + PNGs) under ``out_dir`` and return the path of catalog.csv.

    Classes are balanced (sizes differ by at most one) and every class is present, so ``n``
    must be at least ``n_classes``. With ``long_tail``, :data:`LONG_TAIL_HEAD` classes spread
    over the families (:func:`class_sizes`) get :data:`LONG_TAIL_RATIO` times the items of each
    other class: the imbalance ``--class-weight`` and ``--label-smoothing`` are for. With ``harder``,
modalities are weak more often and 8% of the labels are another variant of the family (see the
module docstring). Ids are ``SKU-<first_id + i>`` (``first_id``: new items for an append); with
``labelled=False`` the csv has no label column (items to predict). Each item is drawn from its
own seed stream; files of an
    earlier run in ``out_dir`` are overwritten (images beyond the new ``n`` are left alone).

    ``missing_image`` / ``empty_text``: the share of items (each drawn independently, from
    their own seed streams) written with an empty image value (no photo; its PNG is not
    written) / an empty title and description. Both 0 by default: the files are then
    byte-identical to those written before these options existed.

    ``images_per_item`` ``(a, b)``: each item gets a seeded uniform number of images in
    ``a..b`` (a gallery, joined by ``|`` in the csv; docs/extract.md). The first is the item's
    usual image; each other one is another view of the same product (same variant and colour,
    its own position, scale, scene), weak as often as the item's modes make an image weak.
    ``(1, 1)`` (default) writes the files of before.
    """
    _check_int("n_classes", n_classes, 2, MAX_CLASSES)
    _check_int("n", n, n_classes, 10_000_000)
    _check_int("seed", seed, 0, 2**63 - 1)
    _check_int("image_size", image_size, 32, 1024)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    labels = class_labels(n_classes)
    label_rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0])
    if long_tail:
        ys = label_rng.permutation(np.repeat(np.arange(n_classes), class_sizes(n, n_classes)))
    else:
        ys = label_rng.permutation(np.arange(n) % n_classes)  # balanced, every class present
    item_seeds = np.random.SeedSequence([seed, 1])  # item i: child i of this root
    written = ys.copy()  # the labels in the csv: ys, or with --harder some noisy ones
    if harder:
        noise_rng = np.random.default_rng(np.random.SeedSequence([seed, 2]))
        flip = np.flatnonzero(noise_rng.random(n) < P_LABEL_NOISE_HARDER)
        for i in flip:  # another variant of the same family, if the family has one
            fam = ys[i] - ys[i] % VARIANTS_PER_FAMILY
            others = [c for c in range(fam, min(fam + VARIANTS_PER_FAMILY, n_classes))
                      if c != ys[i]]
            if others:
                written[i] = others[int(noise_rng.integers(len(others)))]
    for name, share in (("missing_image", missing_image), ("empty_text", empty_text)):
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share <= 1:
            raise ValueError(f"{name} must be a share in [0, 1], got {share!r}")
    no_image = np.random.default_rng(np.random.SeedSequence([seed, 3])).random(n) < missing_image
    no_text = np.random.default_rng(np.random.SeedSequence([seed, 4])).random(n) < empty_text
    lo, hi = images_per_item
    if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi <= 16):
        raise ValueError(f"images per item must be A-B with 1 <= A <= B <= 16, got {lo}-{hi}")
    views = np.random.default_rng(np.random.SeedSequence([seed, 5])).integers(lo, hi + 1, n)
    modes = MODE_PROBS_HARDER if harder else MODE_PROBS
    rows = []
    for i in range(n):
        rng = np.random.default_rng(np.random.SeedSequence(item_seeds.entropy, spawn_key=(i,)))
        y = int(ys[i])
        item_id = f"SKU-{first_id + i:06d}"
        title, desc, img = _make_item(rng, y, n_classes, image_size, modes)
        rel = f"images/{item_id}.png"
        if no_image[i]:
            rel = ""  # no photo: an empty value in the image column
        else:
            img.save(out / rel, format="PNG", compress_level=6)
            rels = [rel]
            for g, view in enumerate(_more_views(seed, i, y, int(views[i]) - 1, image_size,
                                                 modes), start=1):
                rels.append(f"images/{item_id}_{g}.png")
                view.save(out / rels[-1], format="PNG", compress_level=6)
            rel = IMAGE_SEP.join(rels)
        if no_text[i]:
            title = desc = ""
        rows.append((item_id, title, desc, rel, labels[int(written[i])]))
    path = out / "catalog.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        if labelled:
            w.writerow(("id", "title", "description", "image", "label"))
            w.writerows(rows)
        else:
            w.writerow(("id", "title", "description", "image"))
            w.writerows(r[:4] for r in rows)
    return path


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not lo <= value <= hi:
        raise ValueError(
            f"{name} must be an integer in [{lo}, {hi}], got {value!r}; pass one in range"
        )


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _choice(rng: np.random.Generator, probs: dict[str, float]) -> str:
    keys = list(probs)
    p = np.array([probs[k] for k in keys], dtype=float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


# ----------------------------------------------------------------------------------- item


def _more_views(seed: int, i: int, y: int, k: int, size: int, modes: dict[str, float]):
    """``k`` more photos of item ``i`` (class ``y``), from their own seed stream (so the item's
    first image and text are those of a one-image catalog): the same variant, in a colour of
    its family's palette, each view weak with the modes' image-weak share."""
    if k <= 0:
        return []
    f, v = divmod(y, VARIANTS_PER_FAMILY)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 6, i]))
    colour = _pick(rng, PALETTES[(f // 2) % len(PALETTES)])[1]
    p_weak = modes["image_weak"] + modes["both_weak"]
    return [_image(rng, f, v, _choice(rng, IMAGE_WEAK_KINDS) if rng.random() < p_weak
                   else "lifestyle", colour, size) for _ in range(k)]


def _make_item(rng: np.random.Generator, y: int, n_classes: int, size: int,
               modes: dict[str, float] = MODE_PROBS):
    f, v = divmod(y, VARIANTS_PER_FAMILY)
    fam = FAMILIES[f]
    mode = _choice(rng, modes)
    text_weak = mode in ("text_weak", "both_weak")
    image_weak = mode in ("image_weak", "both_weak")
    text_kind = _choice(rng, TEXT_WEAK_KINDS) if text_weak else "clear"
    image_kind = _choice(rng, IMAGE_WEAK_KINDS) if image_weak else "lifestyle"

    n_fams = math.ceil(n_classes / VARIANTS_PER_FAMILY)
    palette = PALETTES[(f // 2) % len(PALETTES)]
    if rng.random() < P_OFF_PALETTE:
        in_use = PALETTES[: math.ceil(n_fams / 2)]
        others = [p for p in in_use if p != palette]
        palette = _pick(rng, others) if others else palette
    colour_name, colour = _pick(rng, palette)

    material = _pick(rng, fam.materials)
    title, noun = _title(rng, fam, v, text_kind, colour_name, material)
    desc = _description(rng, fam, v, text_kind, noun, material)
    img = _image(rng, f, v, image_kind, colour, size)
    return title, desc, img


def _title(rng, fam: Family, v: int, kind: str, colour: str, material: str) -> tuple[str, str]:
    if kind == "generic":
        parts = [_pick(rng, BRANDS)] if rng.random() < 0.5 else []
        parts.append(_pick(rng, GENERIC_TITLES))
        if rng.random() < 0.6:
            parts += ["-", colour]
        return " ".join(parts), ""
    if kind == "clear":
        noun = _pick(rng, fam.variants[v][1])
    elif kind == "shared":
        options = [w for w, ix in fam.shared if v in ix] or [fam.generic]
        noun = _pick(rng, options)
    else:  # "family"
        noun = fam.generic
    brands = BRANDS[(2 * FAMILIES.index(fam)) % len(BRANDS) :][:4] or BRANDS[:4]
    brand = _pick(rng, brands) if rng.random() < 0.85 else _pick(rng, BRANDS)
    head = []
    if rng.random() < 0.75:
        head.append(brand)
    if rng.random() < 0.6:
        head.append(colour)
    if rng.random() < 0.45:
        head.append(material)
    noun_t = noun.title() if rng.random() < 0.7 else noun
    tail = []
    if rng.random() < 0.5:
        tail.append(_pick(rng, fam.sizes))
    if rng.random() < 0.25:
        tail.append(_pick(rng, EXTRAS))
    style = rng.random()
    if style < 0.7:
        title = " ".join([*head, noun_t, *tail])
    elif style < 0.9:
        title = " ".join([noun_t, *tail]) + (" - " + " ".join(head) if head else "")
    else:
        title = " ".join([*head, noun_t]) + (", " + ", ".join(tail) if tail else "")
    r = rng.random()
    if r < 0.05:
        title = title.upper()
    elif r < 0.10:
        title = title.lower()
    return title, noun


def _description(rng, fam: Family, v: int, kind: str, noun: str, material: str) -> str:
    if kind == "generic":
        return ""
    if rng.random() < P_NO_DESCRIPTION:
        return "" if rng.random() < 0.8 else _pick(rng, ("<p></p>", " ", "<br>", "<p> </p>"))
    # A weak text must not narrow its noun down: reuse the title's noun or the family noun.
    if kind == "clear":
        dnoun = _pick(rng, fam.variants[v][1]) if rng.random() < 0.5 else fam.generic
    else:
        dnoun = noun if rng.random() < 0.6 else fam.generic
    parts = [f"<p>This {material} {dnoun} is made for {_pick(rng, fam.uses)}.</p>"]
    if rng.random() < 0.7:
        feats = rng.permutation(len(fam.features))[: int(rng.integers(2, 5))]
        parts.append("<ul>" + "".join(f"<li>{fam.features[j]}</li>" for j in feats) + "</ul>")
    if rng.random() < 0.5:
        parts.append(f"<p><b>Care:</b> {fam.care}</p>")
    if rng.random() < 0.3:
        parts.append(f"<p><b>Specification:</b> {_pick(rng, fam.sizes)}</p>")
    return "".join(parts)


# ---------------------------------------------------------------------------------- image


def _image(rng, f: int, v: int, kind: str, colour, size: int) -> Image.Image:
    if kind == "lifestyle":
        base, texture = SCENES[f % len(SCENES)]
        bg = _scene(rng, base, texture, size)
        n_props = int(rng.integers(1, 4))
    elif kind == "placeholder":
        return _finish(rng, _placeholder(rng, size))
    else:  # studio or washed
        g = int(rng.integers(228, 250))
        ramp = np.linspace(0, -12, size)[:, None, None]
        arr = np.clip(np.full((size, size, 3), g, float) + ramp, 0, 255)
        bg = Image.fromarray(arr.astype(np.uint8), "RGB")
        n_props = int(rng.integers(0, 2))
    for _ in range(n_props):
        _prop(rng, bg, size)
    scale = rng.uniform(0.45, 0.75) if kind != "washed" else rng.uniform(0.2, 0.32)
    obj = _object(rng, v, colour, max(8, int(size * scale)))
    obj = obj.rotate(rng.uniform(-35, 35), resample=Image.BICUBIC, expand=True)
    if kind == "washed":  # overexposed: blend the object most of the way to white
        a = np.asarray(obj, dtype=float)
        a[..., :3] = a[..., :3] * 0.25 + 255 * 0.75
        obj = Image.fromarray(a.astype(np.uint8), "RGBA")
    cx, cy = rng.uniform(0.32, 0.68, size=2) * size
    bg.paste(obj, (int(cx - obj.width / 2), int(cy - obj.height / 2)), obj)
    return _finish(rng, bg)


def _finish(rng, img: Image.Image) -> Image.Image:
    """Brightness jitter and Gaussian sensor noise."""
    arr = np.asarray(img, dtype=np.float32) * rng.uniform(0.88, 1.12)
    arr += rng.normal(0.0, rng.uniform(2.0, 8.0), size=arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _scene(rng, base, texture: str, size: int) -> Image.Image:
    b = np.array(base, dtype=np.float32) * rng.uniform(0.9, 1.1)
    arr = np.broadcast_to(b, (size, size, 3)).copy()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dark = b * 0.7
    if texture == "tiles":
        step = size / rng.uniform(3.5, 5.5)
        off = rng.uniform(0, step, size=2)
        grid = (((xx + off[0]) % step) < 2) | (((yy + off[1]) % step) < 2)
        arr[grid] = dark
    elif texture == "wood":
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin(yy / size * rng.uniform(18, 30) + 2 * np.sin(xx / size * 3) + phase)
        arr *= (1 + 0.12 * wave)[..., None]
    elif texture == "grass":
        arr *= (1 + rng.normal(0, 0.18, size=(size, size)))[..., None]
    elif texture == "stripes":
        period = size / rng.uniform(3, 5)
        arr[((yy + rng.uniform(0, period)) % period) < period / 2] *= 1.2
    elif texture == "bricks":
        h = size / rng.uniform(6, 9)
        row = (yy // h).astype(int)
        shift = (row % 2) * h
        mortar = ((yy % h) < 2) | (((xx + shift) % (2 * h)) < 2)
        arr[mortar] = (205, 200, 190)
    elif texture == "gradient":
        arr *= (0.6 + 0.8 * yy / size)[..., None]
    elif texture == "speckle":
        arr += rng.normal(0, 14, size=(size, size, 1))
    elif texture == "checks":
        step = size / rng.uniform(5, 8)
        chk = ((xx // step + yy // step) % 2).astype(bool)
        arr[chk] = (205, 80, 80)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _prop(rng, img: Image.Image, size: int) -> None:
    """A small clutter object of a random colour somewhere in the scene."""
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.06, 0.12) * size
    x, y = rng.uniform(0, size, size=2)
    c = tuple(int(t) for t in rng.integers(0, 256, size=3))
    box = [x - r, y - r, x + r, y + r]
    k = int(rng.integers(3))
    if k == 0:
        d.ellipse(box, fill=c)
    elif k == 1:
        d.rectangle(box, fill=c)
    else:
        d.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=c)


def _placeholder(rng, size: int) -> Image.Image:
    """A grey 'no image' tile with a camera pictogram, as catalogs show for missing photos."""
    g = int(rng.integers(205, 235))
    img = Image.new("RGB", (size, size), (g, g, g))
    d = ImageDraw.Draw(img)
    c = (g - 60,) * 3
    s = size
    d.rounded_rectangle(
        [0.3 * s, 0.38 * s, 0.7 * s, 0.66 * s], radius=0.04 * s, outline=c, width=max(1, s // 40)
    )
    d.ellipse([0.43 * s, 0.44 * s, 0.57 * s, 0.6 * s], outline=c, width=max(1, s // 40))
    d.rectangle([0.36 * s, 0.34 * s, 0.44 * s, 0.38 * s], fill=c)
    if rng.random() < 0.5:
        d.line([0.25 * s, 0.75 * s, 0.75 * s, 0.25 * s], fill=c, width=max(1, s // 40))
    return img


def _object(rng, v: int, colour, m: int) -> Image.Image:
    """The product on a transparent m x m canvas: silhouette from the variant, then a pattern."""
    mask = Image.new("L", (m, m), 0)
    d = ImageDraw.Draw(mask)
    w = max(2, m // 14)
    if v == 0:  # round body, side handle, lid knob
        d.ellipse([0.12 * m, 0.28 * m, 0.78 * m, 0.92 * m], fill=255)
        d.ellipse([0.62 * m, 0.4 * m, 0.95 * m, 0.75 * m], outline=255, width=w)
        d.ellipse([0.38 * m, 0.16 * m, 0.52 * m, 0.3 * m], fill=255)
    elif v == 1:  # box
        d.rounded_rectangle([0.12 * m, 0.22 * m, 0.88 * m, 0.82 * m], radius=0.08 * m, fill=255)
    else:  # tall bottle with neck and cap
        d.rounded_rectangle([0.33 * m, 0.34 * m, 0.67 * m, 0.95 * m], radius=0.06 * m, fill=255)
        d.polygon(
            [(0.33 * m, 0.36 * m), (0.43 * m, 0.2 * m), (0.57 * m, 0.2 * m), (0.67 * m, 0.36 * m)],
            fill=255,
        )
        d.rectangle([0.41 * m, 0.06 * m, 0.59 * m, 0.2 * m], fill=255)
    pattern = PATTERNS[v] if rng.random() >= P_RANDOM_PATTERN else _pick(rng, PATTERNS)
    fill = _pattern(rng, pattern, colour, m)
    obj = Image.new("RGBA", (m, m), (0, 0, 0, 0))
    obj.paste(fill, (0, 0), mask)
    od = ImageDraw.Draw(obj)
    edge = tuple(int(c * 0.55) for c in colour) + (255,)
    if v == 1:  # a band across the box
        od.rectangle([0.12 * m, 0.45 * m, 0.88 * m, 0.55 * m], fill=edge)
    # shading: darken the lower-right half a little for some depth
    a = np.asarray(obj, dtype=np.float32)
    yy, xx = np.mgrid[0:m, 0:m].astype(np.float32) / m
    a[..., :3] *= (1.1 - 0.3 * (xx + yy) / 2)[..., None]
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGBA")


def _pattern(rng, pattern: str, colour, m: int) -> Image.Image:
    base = np.array(colour, dtype=np.float32)
    lum = base.mean()
    second = np.array((245, 245, 240) if lum < 150 else (30, 30, 35), dtype=np.float32)
    arr = np.broadcast_to(base, (m, m, 3)).copy()
    yy, xx = np.mgrid[0:m, 0:m].astype(np.float32)
    step = m / rng.uniform(5, 8)
    if pattern == "stripes":
        arr[(yy % step) < step * 0.4] = second
    elif pattern == "dots":
        cy, cx = yy % step - step / 2, xx % step - step / 2
        arr[cy**2 + cx**2 < (step * 0.25) ** 2] = second
    elif pattern == "checks":
        arr[((xx // step + yy // step) % 2).astype(bool)] = second
    return Image.fromarray(arr.astype(np.uint8), "RGB")


# ------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Write a synthetic multimodal product catalog (catalog.csv + images/).",
    )
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--n", type=int, default=2000, help="number of items (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--classes", type=int, default=24, help=f"classes, 2..{MAX_CLASSES}")
    p.add_argument("--image-size", type=int, default=128, help="image side in pixels")
    p.add_argument("--long-tail", action="store_true",
                   help=f"imbalanced classes: {LONG_TAIL_HEAD} classes get {LONG_TAIL_RATIO}x "
                   "the items of each other class (default: balanced)")
    p.add_argument("--harder", action="store_true",
                   help="sources disagree more: more weak-modality items and 8%% label noise "
                   "within a family (see the module docstring)")
    p.add_argument("--first-id", type=int, default=0,
                   help="ids start at SKU-<first-id> (new items to append; default 0)")
    p.add_argument("--no-labels", action="store_true",
                   help="write no label column (items to predict)")
    p.add_argument("--missing-image", type=float, default=0.0, metavar="P",
                   help="share of items with no photo (empty image value; default 0)")
    p.add_argument("--empty-text", type=float, default=0.0, metavar="P",
                   help="share of items with an empty title and description (default 0)")
    p.add_argument("--images-per-item", default="1-1", metavar="A-B",
                   help="photos per item, seeded uniform in A..B (e.g. 1-4: a gallery, '|' in "
                   "the csv; default 1)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        lo, _, hi = args.images_per_item.partition("-")
        if not (lo.strip().isdigit() and (hi or lo).strip().isdigit()):
            raise ValueError(f"--images-per-item must be A-B (e.g. 1-4), got "
                             f"{args.images_per_item!r}")
        path = make_catalog(args.out, args.n, args.seed, args.classes, args.image_size,
                            long_tail=args.long_tail, harder=args.harder,
                            first_id=args.first_id, labelled=not args.no_labels,
                            missing_image=args.missing_image, empty_text=args.empty_text,
                            images_per_item=(int(lo), int(hi or lo)))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.n} items, {args.classes} classes to {path} "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
