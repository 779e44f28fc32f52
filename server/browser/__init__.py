"""The memory browser: a small web page served with the server (``--browser``).

``http`` serves the page and its JSON API behind the server's API keys;
``views`` turns domain values into the JSON the page reads. The page is plain
HTML and JavaScript in ``static/``: no build step.
"""
