"""Issue 22 (hardening): nothing a user made is replaced, secrets stay where they were sent, an interrupted command
stops promptly. One test (or a few) per item; each failed on the code before its fix."""

from __future__ import annotations

# --------------------------------------------------------------------------- data: strip_html


def test_strip_html_cuts_blocks_at_their_offsets_in_the_original_text():
    from tuneforge.data.clean import strip_html

    # 'İ'.lower() is two characters: offsets of text.lower() used on text cut three characters too far
    assert strip_html("İİİ<script>x</script>keep me") == "İİİkeep me"
    assert strip_html("İ<STYLE>p {}</Style >after<!-- c -->end") == "İafterend"
    assert strip_html("ok<script>never closed") == "ok"
