"""Launch the ovseg demo: ``python app.py`` (``--help`` lists the model flags, ``--share`` makes a
public link). Every flag also reads an environment variable; see ``ovseg/demo/settings.py``."""

from ovseg.demo import launch

if __name__ == "__main__":
    launch()
