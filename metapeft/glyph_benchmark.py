"""An Omniglot-like many-class benchmark rendered from the fonts that matplotlib ships, so it needs no download.

An *alphabet* is a Unicode block of letters (Basic Latin, Cyrillic, Georgian, Canadian syllabics, Braille, ...);
a *character* is a code point of it that some font draws as a non-empty glyph unlike every glyph kept before it
(duplicates are found by hashing the binarized glyph at the task's resolution: Latin A, Greek Alpha and Cyrillic A
are one character). Each instance of a character is its glyph in a font chosen at random among those that draw it,
with a random stroke width, rotation, scale, shear and translation, as grayscale ink (1) on black (0).

Alphabets, not characters, are split between meta-training ("background") and evaluation, as Omniglot is: a
meta-test character comes from an alphabet never seen in meta-training. Everything is determined by the settings
and the font files; the result is written once into the cache in the Omniglot folder layout that
``task=image_folder`` reads, next to an ``arrays.npz`` that ``task=glyphs`` loads in one read.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import unicodedata
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
CANVAS = 64  # glyphs are drawn and distorted at this size, then reduced to the task's image size
FONT_SIZE = 40

# The Unicode blocks whose letters become alphabets (start, end inclusive, name). Blocks of mathematical and
# letterlike symbols are left out: they are styled copies of Latin and Greek letters, not writing systems.
BLOCKS = (
    (0x0000, 0x007F, "Basic Latin"), (0x0080, 0x00FF, "Latin-1 Supplement"), (0x0100, 0x017F, "Latin Extended-A"),
    (0x0180, 0x024F, "Latin Extended-B"), (0x0250, 0x02AF, "IPA Extensions"), (0x0370, 0x03FF, "Greek and Coptic"),
    (0x0400, 0x04FF, "Cyrillic"), (0x0500, 0x052F, "Cyrillic Supplement"), (0x0530, 0x058F, "Armenian"),
    (0x0590, 0x05FF, "Hebrew"), (0x0600, 0x06FF, "Arabic"), (0x0750, 0x077F, "Arabic Supplement"),
    (0x07C0, 0x07FF, "NKo"), (0x0E80, 0x0EFF, "Lao"), (0x10A0, 0x10FF, "Georgian"),
    (0x1400, 0x167F, "Unified Canadian Aboriginal Syllabics"), (0x1680, 0x169F, "Ogham"),
    (0x1D00, 0x1D7F, "Phonetic Extensions"), (0x1D80, 0x1DBF, "Phonetic Extensions Supplement"),
    (0x1E00, 0x1EFF, "Latin Extended Additional"), (0x1F00, 0x1FFF, "Greek Extended"),
    (0x2800, 0x28FF, "Braille Patterns"), (0x2C00, 0x2C5F, "Glagolitic"), (0x2C60, 0x2C7F, "Latin Extended-C"),
    (0x2C80, 0x2CFF, "Coptic"), (0x2D00, 0x2D2F, "Georgian Supplement"), (0x2D30, 0x2D7F, "Tifinagh"),
    (0xA4D0, 0xA4FF, "Lisu"), (0xA640, 0xA69F, "Cyrillic Extended-B"), (0xA720, 0xA7FF, "Latin Extended-D"),
    (0xFB00, 0xFB4F, "Alphabetic Presentation Forms"), (0xFB50, 0xFDFF, "Arabic Presentation Forms-A"),
    (0xFE70, 0xFEFF, "Arabic Presentation Forms-B"), (0x10300, 0x1032F, "Old Italic"),
)
LETTER_CATEGORIES = ("Lu", "Ll", "Lt", "Lo")
# DejaVu and STIX in all their styles; not the Computer Modern and STIX size/non-Unicode fonts (they map code
# points to unrelated math glyphs) and not LastResort (a placeholder box for every code point).
FONT_PREFIXES = ("DejaVuSans.", "DejaVuSans-", "DejaVuSansMono", "DejaVuSerif.", "DejaVuSerif-", "STIXGeneral")


@dataclass(frozen=True)
class Settings:
    image_size: int
    instances: int  # images per character
    max_characters_per_alphabet: int  # the largest blocks (Braille, Canadian syllabics) are subsampled to this
    min_characters_per_alphabet: int
    evaluation_fraction: float  # of the characters, in evaluation alphabets (whole alphabets)
    seed: int


def font_files() -> list[Path]:
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    files = sorted(f for f in folder.glob("*.ttf") if f.name.startswith(FONT_PREFIXES))
    # DejaVu Sans first: its glyph decides which of two look-alike code points is kept
    return sorted(files, key=lambda f: f.name != "DejaVuSans.ttf")


def block_of(code_point: int) -> str | None:
    for start, end, name in BLOCKS:
        if start <= code_point <= end:
            return name
    return None


def is_letter(code_point: int) -> bool:
    category = unicodedata.category(chr(code_point))
    return category in LETTER_CATEGORIES or (category == "So" and block_of(code_point) == "Braille Patterns")


class Renderer:
    def __init__(self, fonts: list[Path]):
        from matplotlib.ft2font import FT2Font
        from PIL import ImageFont

        self.fonts = [ImageFont.truetype(str(path), FONT_SIZE) for path in fonts]
        self.coverage: dict[int, list[int]] = {}  # code point -> fonts that map it to a real glyph
        for index, path in enumerate(fonts):
            for code_point, glyph in FT2Font(str(path)).get_charmap().items():
                if glyph:  # glyph 0 is .notdef, the box drawn for a missing character
                    self.coverage.setdefault(code_point, []).append(index)

    def draw(self, code_point: int, font: int, stroke: int = 0):
        from PIL import Image, ImageDraw

        image = Image.new("L", (CANVAS, CANVAS), 0)
        ImageDraw.Draw(image).text((CANVAS / 2, CANVAS / 2), chr(code_point), fill=255, font=self.fonts[font],
                                   anchor="mm", stroke_width=stroke, stroke_fill=255)
        return image

    def reduce(self, image, size: int) -> np.ndarray:
        from PIL import Image

        return np.asarray(image.resize((size, size), Image.LANCZOS), dtype=np.uint8)

    def instance(self, code_point: int, fonts: list[int], size: int, rng: np.random.Generator) -> np.ndarray:
        """One handwriting-like variant: random font, stroke width and affine distortion about the centre."""
        from PIL import Image

        image = self.draw(code_point, fonts[rng.integers(len(fonts))], stroke=int(rng.integers(0, 3)))
        angle = np.deg2rad(rng.uniform(-15, 15))
        scale = rng.uniform(0.8, 1.1)
        shear = rng.uniform(-0.25, 0.25)
        shift = rng.uniform(-4, 4, size=2)
        forward = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ np.array(
            [[1.0, shear], [0.0, 1.0]])
        inverse = np.linalg.inv(forward)  # PIL maps each output pixel back to the input
        centre = np.full(2, CANVAS / 2)
        offset = centre - inverse @ (centre + shift)
        data = (inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1])
        return self.reduce(image.transform((CANVAS, CANVAS), Image.AFFINE, data, resample=Image.BILINEAR), size)


def select_characters(renderer: Renderer, settings: Settings) -> dict[str, list[tuple[int, list[int]]]]:
    """alphabet -> [(code point, fonts that draw it)], distinct non-empty glyphs only."""
    seen: set[str] = set()
    alphabets: dict[str, list[tuple[int, list[int]]]] = {}
    # a first run's bar (interactive consoles only: disable=None): every code point is drawn in every font
    for code_point in tqdm(sorted(renderer.coverage), desc="glyph benchmark: choose characters", disable=None,
                           leave=False, mininterval=1.0):
        alphabet = block_of(code_point)
        if alphabet is None or not is_letter(code_point):
            continue
        drawn = {f: renderer.draw(code_point, f) for f in renderer.coverage[code_point]}
        fonts = [f for f, image in drawn.items() if image.getbbox() is not None]  # some fonts map a blank glyph
        if not fonts:
            continue
        ink = renderer.reduce(drawn[fonts[0]], settings.image_size) > 96
        digest = hashlib.sha1(ink.tobytes()).hexdigest()
        if ink.sum() < 4 or digest in seen:  # blank at this resolution, or a look-alike of a kept character
            continue
        seen.add(digest)
        alphabets.setdefault(alphabet, []).append((code_point, fonts))
    rng = np.random.default_rng([settings.seed, 0])
    kept = {}
    for name, characters in sorted(alphabets.items()):
        if len(characters) < settings.min_characters_per_alphabet:
            continue
        if len(characters) > settings.max_characters_per_alphabet:
            picks = np.sort(rng.choice(len(characters), settings.max_characters_per_alphabet, replace=False))
            characters = [characters[i] for i in picks]
        kept[name] = characters
    return kept


def split_alphabets(alphabets: dict[str, list], settings: Settings) -> dict[str, str]:
    """alphabet -> "background" or "evaluation": whole alphabets, shuffled, until the evaluation share is met."""
    names = sorted(alphabets)
    order = np.random.default_rng([settings.seed, 1]).permutation(len(names))
    total = sum(len(alphabets[n]) for n in names)
    parts, evaluation = {}, 0
    for i in order:
        name = names[i]
        if evaluation < settings.evaluation_fraction * total:
            parts[name], evaluation = "evaluation", evaluation + len(alphabets[name])
        else:
            parts[name] = "background"
    return parts


def generate(directory: Path, settings: Settings) -> None:
    """Write the benchmark into ``directory`` (which must not exist): PNG folders, arrays.npz, manifest.json."""
    from PIL import Image

    directory.mkdir()
    fonts = font_files()
    renderer = Renderer(fonts)
    alphabets = select_characters(renderer, settings)
    parts = split_alphabets(alphabets, settings)
    images, names, part_of = [], [], []
    bar = tqdm(total=sum(map(len, alphabets.values())), desc="glyph benchmark: draw characters", disable=None,
               leave=False, mininterval=1.0)
    for alphabet, characters in sorted(alphabets.items()):
        folder_name = alphabet.replace(" ", "_")
        for code_point, character_fonts in characters:
            bar.update()
            rng = np.random.default_rng([settings.seed, 2, code_point])  # per character: independent of the rest
            drawn = np.stack([renderer.instance(code_point, character_fonts, settings.image_size, rng)
                              for _ in range(settings.instances)])
            character = f"U+{code_point:04X}"
            folder = directory / f"images_{parts[alphabet]}" / folder_name / character
            folder.mkdir(parents=True)
            for i, image in enumerate(drawn):
                Image.fromarray(image).save(folder / f"{i:02d}.png")
            images.append(drawn)
            names.append(f"{folder_name}/{character}")
            part_of.append(parts[alphabet])
    bar.close()
    np.savez(directory / "arrays.npz", images=np.stack(images), names=np.array(names), parts=np.array(part_of))
    manifest = {
        "settings": settings.__dict__, "fonts": [f.name for f in fonts],
        "alphabets": {name: {"characters": len(chars), "part": parts[name]} for name, chars in alphabets.items()},
        "characters": {part: sum(p == part for p in part_of) for part in ("background", "evaluation")},
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=1))


def cache_key(settings: Settings) -> str:
    fonts = [(f.name, f.stat().st_size) for f in font_files()]
    identity = {"version": FORMAT_VERSION, "settings": settings.__dict__, "fonts": fonts}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def ensure(cache_dir: str | Path, settings: Settings) -> Path:
    """The benchmark's folder in the cache, generated by the first job that asks; others wait on a file lock.
    Generated into a temporary folder and renamed, so a folder under the final name is always complete."""
    cache = Path(cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    directory = cache / f"glyphs-{cache_key(settings)}"
    if (directory / "arrays.npz").exists():
        return directory
    with open(cache / f"{directory.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for the glyph benchmark %s, being generated by another job", directory)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if not directory.exists():
            log.info("generating the glyph benchmark into %s (once; reused after)", directory)
            scratch = Path(tempfile.mkdtemp(dir=cache, prefix=f".{directory.name}."))
            try:
                scratch.rmdir()  # recreated by generate under the umask: mkdtemp's 0700 would hide it from colleagues
                generate(scratch, settings)
                os.replace(scratch, directory)
            except BaseException:
                shutil.rmtree(scratch, ignore_errors=True)
                raise
    return directory


def ensure_loaded(cache_dir: str | Path, settings: Settings) -> tuple[Path, dict[str, dict[str, np.ndarray]]]:
    """``ensure``, then ``load``. A cached folder whose arrays cannot be read (damaged outside metapeft: generation
    itself writes atomically) is moved aside and generated again, with a warning, instead of failing the run."""
    directory = ensure(cache_dir, settings)
    try:
        return directory, load(directory)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        log.warning("the glyph benchmark in %s cannot be read (%s: %s); generating it again", directory,
                    type(error).__name__, error)
    aside = directory.with_name(f".damaged-{directory.name}-{os.getpid()}")
    try:
        os.replace(directory, aside)
    except FileNotFoundError:  # another job moved it first
        pass
    shutil.rmtree(aside, ignore_errors=True)
    directory = ensure(cache_dir, settings)
    return directory, load(directory)


def load(directory: Path) -> dict[str, dict[str, np.ndarray]]:
    """part ("background" / "evaluation") -> "alphabet/character" -> images (instances, size, size) in [0, 1]."""
    with np.load(directory / "arrays.npz") as arrays:
        images, names, parts = arrays["images"], arrays["names"], arrays["parts"]
    loaded: dict[str, dict[str, np.ndarray]] = {"background": {}, "evaluation": {}}
    for image, name, part in zip(images, names, parts):
        loaded[str(part)][str(name)] = image.astype(np.float32) / 255.0
    return loaded
