"""Write .dvc/plots-offline.html: DVC's plots page with vega inlined, so `dvc plots show` renders offline.

DVC's default page loads vega from a CDN. A template without the `{scripts}` placeholder
keeps those tags out; the libraries are inlined instead. Regenerate with `make plots-template`
(fetches vega, vega-lite and vega-embed from the npm registry).
"""

import sys
from pathlib import Path

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <script type="text/javascript">INLINE</script>
    <style>table {{ border-spacing: 15px; }}</style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def main(vega: str, vega_lite: str, vega_embed: str, out: str = ".dvc/plots-offline.html") -> None:
    code = "\n;\n".join(Path(p).read_text() for p in (vega, vega_lite, vega_embed))
    code = code.replace("</script", "<\\/script")  # keep the inline block closed where we close it
    page = PAGE.replace("{{", "{").replace("}}", "}").replace("INLINE", code)
    for placeholder in ("{scripts}", "{plot_divs}", "{refresh_tag}"):
        assert page.count(placeholder) == (0 if placeholder == "{scripts}" else 1), placeholder
    Path(out).write_text(page)


if __name__ == "__main__":
    main(*sys.argv[1:])
