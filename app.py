"""Launch the ovseg demo: ``python app.py`` (add ``--share`` for a public link)."""

import argparse
import os

from ovseg.demo import build_demo

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    # Hugging Face Spaces set GRADIO_SERVER_NAME/PORT; locally the demo stays on loopback.
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--share", action="store_true")
    args = parser.parse_args()
    build_demo().queue().launch(server_name=args.host, server_port=args.port, share=args.share)
