"""Render the ToyWorld thing sprites from the Noto Color Emoji font into one sprite sheet.

Usage::

    apt-get install -y fonts-noto-color-emoji
    python training/make_sprites.py --out assets/sprites

Writes ``sheet.png`` (RGBA, 64x64 cells, row-major), ``sprites.json`` (names, synonyms, groups,
emoji and code points per cell) and ``OFL.txt`` (the font's licence) into ``--out``. The output
depends only on this file and the font, so re-running it reproduces the committed assets.
``ovseg.data.toyworld`` reads these files and never the font.

The sprite order below is ToyWorld's class order (after the stuff classes), so editing ``SPRITES``
changes class ids: retrain the toy models afterwards.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT_PATH = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
FONT_COPYRIGHT = Path("/usr/share/doc/fonts-noto-color-emoji/copyright")
FONT_SIZE = 109  # the only size at which Noto Color Emoji's bitmap strikes render
CELL = 64
COLUMNS = 20
MIN_OPAQUE_FRACTION = 0.05  # a glyph covering less of its cell rendered blank or broken

# (emoji, name, synonyms, group). Names are what a person would call the object; synonyms are
# other everyday words for the same object. Near-duplicates (moon phases, a second clock, a
# second train carriage) are left out so that a toy model can tell every class apart, and so are
# faces, people, hands, hearts, flags and symbols.
SPRITES: list[tuple[str, str, list[str], str]] = [
    # animals
    ("🐈", "cat", ["kitty", "kitten"], "animal"),
    ("🐕", "dog", ["puppy", "doggy"], "animal"),
    ("🐒", "monkey", ["primate"], "animal"),
    ("🐎", "horse", ["pony", "stallion"], "animal"),
    ("🦓", "zebra", ["striped horse"], "animal"),
    ("🦌", "deer", ["stag", "reindeer"], "animal"),
    ("🐄", "cow", ["cattle", "dairy cow"], "animal"),
    ("🐖", "pig", ["hog", "swine"], "animal"),
    ("🐑", "sheep", ["lamb", "ram"], "animal"),
    ("🐪", "camel", ["dromedary"], "animal"),
    ("🦒", "giraffe", ["camelopard"], "animal"),
    ("🐘", "elephant", ["jumbo", "pachyderm"], "animal"),
    ("🦏", "rhino", ["rhinoceros"], "animal"),
    ("🦛", "hippo", ["hippopotamus"], "animal"),
    ("🐁", "mouse", ["rodent"], "animal"),
    ("🐇", "rabbit", ["bunny", "hare"], "animal"),
    ("🐿", "squirrel", ["chipmunk"], "animal"),
    ("🦇", "bat", ["flying fox"], "animal"),
    ("🐻", "bear", ["grizzly", "brown bear"], "animal"),
    ("🐨", "koala", ["koala bear"], "animal"),
    ("🐼", "panda", ["giant panda"], "animal"),
    ("🦘", "kangaroo", ["wallaby"], "animal"),
    ("🦊", "fox", ["vixen"], "animal"),
    ("🐅", "tiger", ["bengal tiger"], "animal"),
    ("🐆", "leopard", ["cheetah", "jaguar"], "animal"),
    ("🦁", "lion", ["lioness"], "animal"),
    ("🦃", "turkey", ["gobbler"], "animal"),
    ("🐓", "chicken", ["rooster", "hen"], "animal"),
    ("🐧", "penguin", ["emperor penguin"], "animal"),
    ("🦅", "eagle", ["hawk", "falcon"], "animal"),
    ("🦆", "duck", ["mallard"], "animal"),
    ("🦢", "swan", ["cygnet"], "animal"),
    ("🦉", "owl", ["barn owl"], "animal"),
    ("🦩", "flamingo", ["pink flamingo"], "animal"),
    ("🦚", "peacock", ["peafowl"], "animal"),
    ("🦜", "parrot", ["macaw"], "animal"),
    ("🐸", "frog", ["toad"], "animal"),
    ("🐊", "crocodile", ["alligator"], "animal"),
    ("🐢", "turtle", ["tortoise"], "animal"),
    ("🐍", "snake", ["serpent"], "animal"),
    ("🐉", "dragon", ["wyvern"], "animal"),
    ("🦕", "dinosaur", ["brontosaurus"], "animal"),
    ("🐋", "whale", ["blue whale"], "animal"),
    ("🐬", "dolphin", ["porpoise"], "animal"),
    ("🐟", "fish", ["herring"], "animal"),
    ("🦈", "shark", ["great white"], "animal"),
    ("🐙", "octopus", ["cephalopod"], "animal"),
    ("🦐", "shrimp", ["prawn"], "animal"),
    ("🦀", "crab", ["shore crab"], "animal"),
    ("🐚", "seashell", ["shell", "conch"], "animal"),
    ("🐌", "snail", ["garden snail"], "animal"),
    ("🦋", "butterfly", ["monarch"], "animal"),
    ("🐜", "ant", ["worker ant"], "animal"),
    ("🐝", "bee", ["honeybee", "bumblebee"], "animal"),
    ("🐞", "ladybug", ["ladybird"], "animal"),
    ("🕷", "spider", ["tarantula"], "animal"),
    ("🪼", "jellyfish", ["jelly", "medusa"], "animal"),
    # plants
    ("🌸", "cherry blossom", ["sakura"], "plant"),
    ("🌹", "rose", ["red rose"], "plant"),
    ("🌻", "sunflower", ["helianthus"], "plant"),
    ("🌷", "tulip", ["pink tulip"], "plant"),
    ("🌱", "seedling", ["sprout"], "plant"),
    ("🪴", "potted plant", ["houseplant"], "plant"),
    ("🌲", "pine tree", ["fir tree", "evergreen"], "plant"),
    ("🌳", "tree", ["oak tree"], "plant"),
    ("🌴", "palm tree", ["coconut tree"], "plant"),
    ("🌵", "cactus", ["saguaro"], "plant"),
    ("🌾", "wheat", ["ear of grain"], "plant"),
    ("🍀", "four-leaf clover", ["clover", "shamrock"], "plant"),
    ("🍁", "maple leaf", ["autumn leaf"], "plant"),
    ("🍄", "mushroom", ["toadstool"], "plant"),
    ("🪵", "log", ["timber", "firewood"], "plant"),
    # fruit and vegetables
    ("🍇", "grapes", ["bunch of grapes"], "food"),
    ("🍉", "watermelon", ["melon"], "food"),
    ("🍊", "orange", ["tangerine", "mandarin"], "food"),
    ("🍋", "lemon", ["yellow lemon"], "food"),
    ("🍌", "banana", ["plantain"], "food"),
    ("🍍", "pineapple", ["ananas"], "food"),
    ("🍎", "apple", ["red apple"], "food"),
    ("🍐", "pear", ["green pear"], "food"),
    ("🍑", "peach", ["nectarine"], "food"),
    ("🍒", "cherries", ["cherry"], "food"),
    ("🍓", "strawberry", ["wild strawberry"], "food"),
    ("🍅", "tomato", ["roma tomato"], "food"),
    ("🥥", "coconut", ["coconut half"], "food"),
    ("🥑", "avocado", ["avo"], "food"),
    ("🍆", "eggplant", ["aubergine"], "food"),
    ("🥔", "potato", ["spud", "tater"], "food"),
    ("🥕", "carrot", ["baby carrot"], "food"),
    ("🌽", "corn", ["maize", "corn cob"], "food"),
    ("🌶", "chili pepper", ["hot pepper", "chilli"], "food"),
    ("🥦", "broccoli", ["calabrese"], "food"),
    ("🧅", "onion", ["shallot"], "food"),
    # prepared food
    ("🍞", "bread", ["loaf"], "food"),
    ("🥐", "croissant", ["crescent roll"], "food"),
    ("🥞", "pancakes", ["pancake", "hotcakes"], "food"),
    ("🧀", "cheese", ["wedge of cheese"], "food"),
    ("🍔", "hamburger", ["burger", "cheeseburger"], "food"),
    ("🍟", "french fries", ["fries", "chips"], "food"),
    ("🍕", "pizza", ["slice of pizza"], "food"),
    ("🌭", "hot dog", ["frankfurter", "sausage"], "food"),
    ("🥪", "sandwich", ["sub", "toastie"], "food"),
    ("🌮", "taco", ["tortilla"], "food"),
    ("🥚", "egg", ["boiled egg"], "food"),
    ("🍳", "fried egg", ["frying pan"], "food"),
    ("🥗", "salad", ["green salad"], "food"),
    ("🍝", "spaghetti", ["pasta"], "food"),
    ("🍣", "sushi", ["maki"], "food"),
    ("🍦", "ice cream", ["soft serve", "ice cream cone"], "food"),
    ("🍩", "doughnut", ["donut"], "food"),
    ("🍪", "cookie", ["biscuit"], "food"),
    ("🎂", "birthday cake", ["cake"], "food"),
    ("🧁", "cupcake", ["muffin"], "food"),
    ("🍫", "chocolate bar", ["chocolate"], "food"),
    ("🍭", "lollipop", ["lolly"], "food"),
    ("🍯", "honey pot", ["honey", "honey jar"], "food"),
    # drinks and tableware
    ("🍼", "baby bottle", ["feeding bottle"], "drink"),
    ("🥛", "glass of milk", ["milk"], "drink"),
    ("☕", "coffee", ["cup of coffee", "mug"], "drink"),
    ("🫖", "teapot", ["kettle"], "drink"),
    ("🍾", "champagne", ["bottle of champagne"], "drink"),
    ("🍷", "wine glass", ["wine", "glass of wine"], "drink"),
    ("🍸", "cocktail", ["martini"], "drink"),
    ("🍺", "beer", ["beer mug", "pint"], "drink"),
    ("🥤", "soda cup", ["soft drink", "cup with straw"], "drink"),
    ("🥢", "chopsticks", ["eating sticks"], "object"),
    ("🍽", "plate", ["dinner plate", "place setting"], "object"),
    ("🥄", "spoon", ["teaspoon", "tablespoon"], "object"),
    ("🔪", "knife", ["kitchen knife"], "object"),
    ("🏺", "amphora", ["vase", "urn"], "object"),
    # vehicles and traffic
    ("🚂", "locomotive", ["steam train", "steam engine"], "vehicle"),
    ("🚄", "bullet train", ["high-speed train"], "vehicle"),
    ("🚊", "tram", ["streetcar", "trolley"], "vehicle"),
    ("🚌", "bus", ["coach"], "vehicle"),
    ("🚑", "ambulance", ["emergency vehicle"], "vehicle"),
    ("🚒", "fire engine", ["fire truck"], "vehicle"),
    ("🚓", "police car", ["patrol car"], "vehicle"),
    ("🚕", "taxi", ["cab", "taxicab"], "vehicle"),
    ("🚗", "car", ["automobile", "sedan"], "vehicle"),
    ("🚚", "delivery truck", ["box truck"], "vehicle"),
    ("🚜", "tractor", ["farm tractor"], "vehicle"),
    ("🏎", "racing car", ["race car", "formula one car"], "vehicle"),
    ("🏍", "motorcycle", ["motorbike"], "vehicle"),
    ("🛵", "scooter", ["moped"], "vehicle"),
    ("🚲", "bicycle", ["bike", "push bike"], "vehicle"),
    ("⛵", "sailboat", ["sailing boat", "yacht"], "vehicle"),
    ("🛶", "canoe", ["kayak"], "vehicle"),
    ("🚤", "speedboat", ["motorboat"], "vehicle"),
    ("🚢", "ship", ["ocean liner", "steamship"], "vehicle"),
    ("✈", "airplane", ["plane", "aeroplane", "jet"], "vehicle"),
    ("🚁", "helicopter", ["chopper"], "vehicle"),
    ("🚀", "rocket", ["spaceship"], "vehicle"),
    ("🛸", "flying saucer", ["ufo"], "vehicle"),
    ("🪂", "parachute", ["chute"], "vehicle"),
    ("⛽", "fuel pump", ["gas pump", "petrol pump"], "vehicle"),
    ("🚥", "traffic light", ["stoplight"], "vehicle"),
    ("🛑", "stop sign", ["traffic sign"], "vehicle"),
    ("⚓", "anchor", ["boat anchor"], "vehicle"),
    # buildings and landmarks
    ("🏠", "house", ["home", "cottage"], "building"),
    ("🏰", "castle", ["palace", "fortress"], "building"),
    ("⛪", "church", ["chapel"], "building"),
    ("🏭", "factory", ["mill"], "building"),
    ("⛲", "fountain", ["park fountain"], "building"),
    ("⛺", "tent", ["camping tent"], "building"),
    ("🎡", "ferris wheel", ["big wheel"], "building"),
    ("🎢", "roller coaster", ["rollercoaster", "big dipper"], "building"),
    ("🌋", "volcano", ["erupting mountain"], "nature"),
    # tools
    ("🔨", "hammer", ["mallet"], "tool"),
    ("🪓", "axe", ["hatchet"], "tool"),
    ("🪚", "saw", ["handsaw"], "tool"),
    ("🔧", "wrench", ["spanner"], "tool"),
    ("🪛", "screwdriver", ["turnscrew"], "tool"),
    ("🧲", "magnet", ["horseshoe magnet"], "tool"),
    ("🪜", "ladder", ["stepladder"], "tool"),
    ("🔦", "flashlight", ["torch"], "tool"),
    ("🕯", "candle", ["taper", "wax candle"], "object"),
    ("💡", "light bulb", ["lightbulb", "bulb"], "object"),
    ("🔋", "battery", ["power cell"], "tool"),
    ("🔌", "electric plug", ["plug", "power plug"], "tool"),
    ("✂", "scissors", ["shears"], "tool"),
    ("📏", "ruler", ["straight edge"], "tool"),
    ("✏", "pencil", ["lead pencil"], "tool"),
    ("🖌", "paintbrush", ["brush"], "tool"),
    ("🔑", "key", ["door key"], "tool"),
    ("🔒", "padlock", ["lock"], "tool"),
    ("🧹", "broom", ["besom"], "tool"),
    ("🪣", "bucket", ["pail"], "tool"),
    ("🧯", "fire extinguisher", ["extinguisher"], "tool"),
    ("🛒", "shopping cart", ["shopping trolley"], "tool"),
    ("🔬", "microscope", ["lab microscope"], "tool"),
    ("🔭", "telescope", ["spyglass"], "tool"),
    ("💉", "syringe", ["hypodermic needle"], "tool"),
    ("💊", "pill", ["capsule", "tablet"], "tool"),
    ("🧭", "compass", ["magnetic compass"], "tool"),
    ("⏰", "alarm clock", ["clock"], "tool"),
    ("⌚", "wristwatch", ["watch"], "tool"),
    # household objects
    ("🪑", "chair", ["seat"], "object"),
    ("🛋", "couch", ["sofa", "settee"], "object"),
    ("🛏", "bed", ["mattress"], "object"),
    ("🚪", "door", ["doorway"], "object"),
    ("🪟", "window", ["windowpane"], "object"),
    ("🚽", "toilet", ["loo"], "object"),
    ("🛁", "bathtub", ["bath", "tub"], "object"),
    ("🧸", "teddy bear", ["stuffed animal", "plush toy"], "object"),
    ("🖼", "framed picture", ["painting", "picture frame"], "object"),
    ("🧳", "suitcase", ["luggage"], "object"),
    ("🎒", "backpack", ["rucksack", "school bag"], "object"),
    ("👜", "handbag", ["purse"], "object"),
    ("🧺", "basket", ["laundry basket"], "object"),
    ("🧻", "toilet paper", ["toilet roll", "paper roll"], "object"),
    ("🪥", "toothbrush", ["tooth brush"], "object"),
    ("📦", "package", ["parcel", "cardboard box"], "object"),
    ("📫", "mailbox", ["letterbox"], "object"),
    ("✉", "envelope", ["letter"], "object"),
    ("📚", "books", ["stack of books", "book"], "object"),
    ("🪙", "coin", ["gold coin", "penny"], "object"),
    ("💵", "banknote", ["dollar bill", "cash"], "object"),
    ("💳", "credit card", ["bank card"], "object"),
    ("🗺", "map", ["world map"], "object"),
    ("🎈", "balloon", ["party balloon"], "object"),
    ("🎁", "gift", ["present", "wrapped gift"], "object"),
    ("🎃", "jack-o-lantern", ["pumpkin"], "object"),
    ("🎄", "christmas tree", ["xmas tree"], "object"),
    ("🏮", "lantern", ["paper lantern"], "object"),
    ("🔔", "bell", ["handbell"], "object"),
    ("🪶", "feather", ["quill"], "object"),
    ("🦴", "bone", ["femur"], "object"),
    ("🪨", "rock", ["stone", "boulder"], "object"),
    # electronics
    ("📱", "mobile phone", ["smartphone", "cellphone"], "electronics"),
    ("☎", "telephone", ["phone", "landline"], "electronics"),
    ("💻", "laptop", ["notebook computer"], "electronics"),
    ("🖥", "desktop computer", ["monitor", "computer screen"], "electronics"),
    ("⌨", "keyboard", ["computer keyboard"], "electronics"),
    ("🖱", "computer mouse", ["pc mouse"], "electronics"),
    ("📷", "camera", ["photo camera"], "electronics"),
    ("📺", "television", ["tv", "telly"], "electronics"),
    ("📻", "radio", ["transistor radio"], "electronics"),
    ("🎙", "microphone", ["mic"], "electronics"),
    ("🎧", "headphones", ["headset"], "electronics"),
    ("🎮", "game controller", ["gamepad", "video game controller"], "electronics"),
    # clothing and accessories
    ("👓", "glasses", ["eyeglasses", "spectacles"], "clothing"),
    ("🕶", "sunglasses", ["shades"], "clothing"),
    ("👕", "t-shirt", ["tee", "shirt"], "clothing"),
    ("👖", "jeans", ["trousers", "pants"], "clothing"),
    ("🧣", "scarf", ["muffler"], "clothing"),
    ("🧤", "gloves", ["mittens"], "clothing"),
    ("🧥", "coat", ["jacket", "overcoat"], "clothing"),
    ("🧦", "socks", ["sock"], "clothing"),
    ("👗", "dress", ["gown", "frock"], "clothing"),
    ("👟", "sneaker", ["running shoe", "trainer"], "clothing"),
    ("🥾", "hiking boot", ["boot"], "clothing"),
    ("👠", "high heel", ["stiletto"], "clothing"),
    ("👑", "crown", ["tiara"], "clothing"),
    ("🎩", "top hat", ["stovepipe hat"], "clothing"),
    ("🎓", "graduation cap", ["mortarboard"], "clothing"),
    ("🧢", "baseball cap", ["cap"], "clothing"),
    ("💍", "ring", ["wedding ring"], "clothing"),
    ("☂", "umbrella", ["parasol"], "clothing"),
    # sport and games
    ("⚽", "soccer ball", ["football"], "sport"),
    ("⚾", "baseball", ["hardball"], "sport"),
    ("🏀", "basketball", ["b-ball"], "sport"),
    ("🏐", "volleyball", ["volley ball"], "sport"),
    ("🏈", "american football", ["gridiron ball"], "sport"),
    ("🎾", "tennis racket", ["racket", "racquet"], "sport"),
    ("🎳", "bowling pins", ["skittles", "bowling ball"], "sport"),
    ("🏓", "ping pong paddle", ["table tennis bat", "ping pong"], "sport"),
    ("🥊", "boxing glove", ["boxing mitt"], "sport"),
    ("⛸", "ice skate", ["skate"], "sport"),
    ("🛹", "skateboard", ["longboard"], "sport"),
    ("🎣", "fishing rod", ["fishing pole"], "sport"),
    ("🎿", "skis", ["ski"], "sport"),
    ("🏆", "trophy", ["cup", "trophy cup"], "sport"),
    ("🏹", "bow and arrow", ["bow", "longbow"], "sport"),
    ("🪁", "kite", ["box kite"], "sport"),
    ("🎯", "dartboard", ["target", "bullseye"], "sport"),
    ("🎱", "billiard ball", ["pool ball", "eight ball"], "sport"),
    ("🎲", "game die", ["dice"], "sport"),
    # instruments
    ("🎷", "saxophone", ["sax"], "instrument"),
    ("🎸", "guitar", ["electric guitar"], "instrument"),
    ("🎹", "piano", ["musical keyboard", "keys"], "instrument"),
    ("🎺", "trumpet", ["horn", "bugle"], "instrument"),
    ("🎻", "violin", ["fiddle"], "instrument"),
    ("🪕", "banjo", ["banjolele"], "instrument"),
    ("🥁", "drum", ["snare drum", "drum kit"], "instrument"),
    ("🪗", "accordion", ["squeezebox"], "instrument"),
    ("🪇", "maracas", ["shakers"], "instrument"),
    ("🪈", "flute", ["recorder", "pipe"], "instrument"),
    # weather and sky
    ("☀", "sun", ["sunshine"], "nature"),
    ("🌙", "crescent moon", ["moon"], "nature"),
    ("🌍", "globe", ["planet earth", "earth"], "nature"),
    ("🪐", "ringed planet", ["saturn", "planet"], "nature"),
    ("⭐", "star", ["yellow star"], "nature"),
    ("🌈", "rainbow", ["arc of colours"], "nature"),
    ("⛄", "snowman", ["frosty"], "nature"),
    ("❄", "snowflake", ["ice crystal"], "nature"),
    ("⚡", "lightning bolt", ["lightning", "thunderbolt"], "nature"),
    ("🔥", "fire", ["flame", "flames"], "nature"),
    ("💧", "water drop", ["droplet", "raindrop"], "nature"),
]


def check_names(sprites: list[tuple[str, str, list[str], str]]) -> None:
    """Raise if a name repeats or if a name or synonym stands for two classes."""
    owner: dict[str, str] = {}
    for _, name, synonyms, _ in sprites:
        for word in [name, *synonyms]:
            if word != word.lower() or not word.strip():
                raise ValueError(f"names must be non-empty lower case, got {word!r}")
            if word in owner:
                raise ValueError(f"{word!r} names both {owner[word]!r} and {name!r}")
            owner[word] = name


def render_glyph(font: ImageFont.FreeTypeFont, emoji: str) -> Image.Image:
    """Draw one emoji, crop it to its opaque pixels and fit it, centred, into a CELL x CELL cell."""
    canvas = Image.new("RGBA", (2 * FONT_SIZE, 2 * FONT_SIZE), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text(
        (FONT_SIZE // 2, FONT_SIZE // 2), emoji, font=font, embedded_color=True
    )
    bbox = canvas.getchannel("A").getbbox()
    if bbox is None:
        return Image.new("RGBA", (CELL, CELL), (0, 0, 0, 0))
    glyph = canvas.crop(bbox)
    # A 1-pixel margin keeps the Lanczos ringing inside the cell.
    scale = (CELL - 2) / max(glyph.size)
    size = (max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale)))
    glyph = glyph.resize(size, Image.Resampling.LANCZOS)  # Pillow premultiplies RGBA here
    cell = Image.new("RGBA", (CELL, CELL), (0, 0, 0, 0))
    cell.paste(glyph, ((CELL - size[0]) // 2, (CELL - size[1]) // 2))
    return cell


def ofl_text(copyright_file: Path) -> str:
    """The font's copyright lines and SIL OFL 1.1 text, taken from the Debian copyright file."""
    text = copyright_file.read_text(encoding="utf-8")
    start = text.rindex("License:   SIL-1.1")  # the licence text, not the Files: stanza
    body = text[start:].splitlines()[1:]
    # Debian indents licence text by one space and writes blank lines as " .".
    lines = ["" if line.strip() == "." else line[1:] for line in body]
    header = (
        "Noto Color Emoji (https://github.com/googlefonts/noto-emoji)\n"
        "Copyright 2013-2017 Google Inc., Arjen Nienhuis <a.g.nienhuis@gmail.com>\n"
        "The ToyWorld sprite sheet (sheet.png) is rendered from this font.\n\n"
    )
    return header + "\n".join(lines).strip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("assets/sprites"), help="output folder")
    parser.add_argument("--font", type=Path, default=FONT_PATH, help="NotoColorEmoji.ttf")
    parser.add_argument(
        "--copyright",
        type=Path,
        default=FONT_COPYRIGHT,
        help="Debian copyright file of fonts-noto-color-emoji (holds the OFL)",
    )
    args = parser.parse_args()

    check_names(SPRITES)
    font = ImageFont.truetype(str(args.font), FONT_SIZE)
    cells, entries = [], []
    for emoji, name, synonyms, group in SPRITES:
        cell = render_glyph(font, emoji)
        if (np.asarray(cell)[..., 3] > 127).mean() < MIN_OPAQUE_FRACTION:
            raise RuntimeError(f"{emoji} ({name}) rendered blank; is the font too old?")
        entries.append(
            {
                "index": len(cells),
                "name": name,
                "synonyms": synonyms,
                "group": group,
                "emoji": emoji,
                "codepoints": "-".join(f"{ord(c):x}" for c in emoji),
            }
        )
        cells.append(cell)

    rows = -(-len(cells) // COLUMNS)
    sheet = Image.new("RGBA", (COLUMNS * CELL, rows * CELL), (0, 0, 0, 0))
    for i, cell in enumerate(cells):
        sheet.paste(cell, ((i % COLUMNS) * CELL, (i // COLUMNS) * CELL))

    args.out.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out / "sheet.png", optimize=True)
    meta = {
        "cell": CELL,
        "columns": COLUMNS,
        "font": "Noto Color Emoji",
        "license": "OFL-1.1",
        "sprites": entries,
    }
    (args.out / "sprites.json").write_text(
        json.dumps(meta, ensure_ascii=False, indent=1) + "\n", encoding="utf-8"
    )
    (args.out / "OFL.txt").write_text(ofl_text(args.copyright), encoding="utf-8")


if __name__ == "__main__":
    main()
