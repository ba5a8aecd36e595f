"""Launch the ovseg demo: ``python app.py`` (add ``--share`` for a public link)."""

import argparse

from ovseg.demo import build_demo

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true")
    args = parser.parse_args()
    build_demo().queue().launch(server_name=args.host, server_port=args.port, share=args.share)
