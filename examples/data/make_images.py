"""Redraws the example folders' images: small coloured shapes, a few hundred bytes each.

    python examples/data/make_images.py

The PNGs are committed; this script only documents how they were made (deterministic).
"""

from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60)}
SHAPES = ("circle", "square", "triangle")
FOLDERS = ("image_text", "conversation", "llava", "vqa", "imagefolder")


def draw(colour: str, shape: str, size: int = 48) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    pen = ImageDraw.Draw(image)
    box = (8, 8, size - 8, size - 8)
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(size // 2, 8), (size - 8, size - 8), (8, size - 8)], fill=fill)
    # A 4-colour palette keeps each file a few hundred bytes.
    return image.quantize(colors=4)


def main() -> None:
    for folder in FOLDERS:
        out = HERE / folder / ("" if folder == "imagefolder" else "images")
        out.mkdir(parents=True, exist_ok=True)
        for colour in COLOURS:
            for shape in SHAPES:
                draw(colour, shape).save(out / f"{colour}_{shape}.png", optimize=True)


if __name__ == "__main__":
    main()
