"""``staralign serve``: a local web page to try a model on photos and webcam frames.

* ``app``: the FastAPI app (:func:`~staralign.web.app.create_app`): the page,
  ``POST /api/landmarks`` (the JSON of ``staralign predict`` for one image) and
  ``GET /api/info``.
* ``uploads``: reading uploads from the raw stream, in memory, within a size limit.
* ``guard``: the ASGI layer in front: Host and Origin checks, uploads per client,
  the body-read timeout, security headers.
* ``server``: the uvicorn server with a per-client connection cap and a deadline
  for request headers.
* ``images``: image type by magic bytes and size from the header, before decoding.
* ``cli``: the ``serve`` command.
* ``static/``: the page (plain HTML, JavaScript and CSS; no build step, no CDN).

Needs the ``web`` extra (``pip install 'staralign[web]'``); importing this package
imports neither FastAPI nor torch.  See docs/web.md.
"""
