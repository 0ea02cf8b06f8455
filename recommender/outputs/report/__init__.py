"""The weekly report: `analysis` and `migrations` and `forecast` read a `History` (pure
functions over frames), `charts` draws, `document` renders the Markdown."""
