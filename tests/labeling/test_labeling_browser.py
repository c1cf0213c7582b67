"""A labeler in a real headless Chromium (Playwright) ranks with the mouse and the keyboard.

Needs the ``playwright`` Python package and a Chromium binary (Debian's ``chromium``; set
``CHROMIUM=/path`` to use another); skips with the reason otherwise. Browsers are never
downloaded. ``LABELING_SCREENSHOT=docs/labeling_screenshot.png`` also saves a screenshot of the
page half way through.
"""
import json
import os
import pathlib
import shutil

from labeling_helpers import ProcessServer, ThreadServer
import pytest

from rlhf_jax.data import comparisons
from rlhf_jax.labeling.__main__ import main
from rlhf_jax.labeling.records import load_sources
from rlhf_jax.labeling.server import create_app
from rlhf_jax.labeling.store import LabelStore

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
XSS = "<script>alert(1)</script>"
XSS_IMG = '<img src=x onerror="alert(2)"> & <b>not bold</b>'

ITEMS = [
    ("I rented this film on a whim and", [
        "it turned out to be the best surprise of the year: sharp writing, a warm cast.", XSS,
        XSS_IMG]),
    ("The first twenty minutes of this movie", [
        "drag badly, but once the heist begins it never lets go.",
        "are the only part worth watching; after that the plot falls apart.",
        "set up a quiet, moving story about two brothers and a failing farm."]),
    ("As a fan of the original series, I", [
        "was thrilled: the reboot keeps the humour and adds real heart.",
        "left the theatre angry. Nothing here respects the characters.",
        "found it fine. Not great, not terrible, just a little long."]),
    ("The acting in this one", [
        "is wooden from start to finish.",
        "is superb, especially the lead, who carries every scene.",
        "is uneven, though the supporting cast shines."]),
    ("My kids begged to see it, and", [
        "we all loved it; the songs are still stuck in our heads.",
        "half of us fell asleep before the end.",
        "it was a pleasant enough way to spend a rainy afternoon."]),
    ("Visually stunning, but", [
        "the story is paper thin and the dialogue is painful.",
        "that is the least of its strengths: the script is wonderful.",
        "the pacing drags in the middle hour."]),
    ("I can't recommend this documentary enough:", [
        "it is careful, funny and deeply humane.",
        "well, actually I can. It is dull.",
        "it changed how I think about food."]),
    ("Ten years later, this film", [
        "still holds up remarkably well.",
        "feels dated and a little embarrassing.",
        "is remembered mostly for its soundtrack."]),
]


def chromium_path():
    for cand in (os.environ.get("CHROMIUM"), shutil.which("chromium"),
                 shutil.which("chromium-browser"), "/usr/bin/chromium"):
        if cand and pathlib.Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    return None


def write_items(folder):
    folder.mkdir(parents=True)
    with open(folder / "train.jsonl", "w", encoding="utf-8") as f:
        for i, (prompt, responses) in enumerate(ITEMS):
            f.write(json.dumps({"id": f"train-{i}", "prompt": prompt, "responses": responses,
                                "ranks": None, "labeler": "",
                                "policies": ["sft@T=0.7", "ppo@T=0.7", "ppo@T=1.0"]}) + "\n")


@pytest.fixture
def browser_page():
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="the playwright package (test extra) is not installed")
    exe = chromium_path()
    if exe is None:
        pytest.skip("no Chromium found (apt-get install chromium, or set CHROMIUM=/path)")
    with sync_api.sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, timeout=60000)
        except Exception as e:  # e.g. a Chromium too old or too new for this Playwright
            pytest.skip(f"could not start {exe} with Playwright: {e}")
        page = browser.new_page(viewport={"width": 1000, "height": 900})
        page.set_default_timeout(20000)
        try:
            yield page
        finally:
            browser.close()


class Labeler:
    """Drives the page; remembers what it ranked, in the record's response order."""

    def __init__(self, page):
        self.page = page
        self.expected = {}  # id -> ranks in the record's order

    def shown(self):
        """``(id, [response text at display position d])``."""
        item_id = self.page.text_content("#item-id").strip("()").split(" · ")[1]
        k = self.page.locator(".card").count()
        texts = [self.page.text_content(f'.card[data-d="{d}"] .text') for d in range(k)]
        return item_id, texts

    def drag(self, d, row):
        """Drags response d onto rank row ``row`` (or onto the pool for ``row=None``)."""
        card = self.page.locator(f'.card[data-d="{d}"]').bounding_box()
        target = self.page.locator("#pool" if row is None else f'.tier[data-row="{row}"]')
        target.scroll_into_view_if_needed()
        card = self.page.locator(f'.card[data-d="{d}"]').bounding_box()
        box = target.bounding_box()
        m = self.page.mouse
        m.move(card["x"] + 12, card["y"] + card["height"] / 2)
        m.down()
        m.move(card["x"] + 30, card["y"] + card["height"] / 2 + 10, steps=3)
        m.move(box["x"] + box["width"] - 40, box["y"] + box["height"] / 2, steps=8)
        m.up()

    def rows(self):
        """``[row of response d]`` as the page shows it (-1 = unranked)."""
        k = self.page.locator(".card").count()
        out = []
        for d in range(k):
            row = self.page.locator(f'.tier:has(.card[data-d="{d}"])')
            out.append(int(row.get_attribute("data-row")) if row.count() else -1)
        return out

    def expect(self, display_ranks):
        item_id, texts = self.shown()
        responses = dict(ITEMS_BY_ID[item_id])["responses"]
        ranks = [0] * len(texts)
        for d, text in enumerate(texts):
            ranks[responses.index(text)] = display_ranks[d]
        self.expected[item_id] = ranks
        return item_id

    def wait_count(self, n):
        self.page.wait_for_function(
            "n => document.getElementById('my-count').textContent.startsWith('You: ' + n + ' ')",
            arg=n)


ITEMS_BY_ID = {f"train-{i}": {"responses": r}.items() for i, (_, r) in enumerate(ITEMS)}


def test_rank_with_mouse_and_keyboard_reload_undo_skip_and_export(tmp_path, browser_page):
    page = browser_page
    write_items(tmp_path / "to_label")
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    srv = ProcessServer([tmp_path / "to_label"], log_path=tmp_path / "server.log").start()
    try:
        page.goto(srv.url + "/")
        page.fill("#name-input", "alice")
        page.click("#name-form button")
        page.wait_for_selector("#work:not([hidden]) .card")
        lab = Labeler(page)

        # Item 1, by mouse. The responses with markup render as text, and nothing runs.
        item_id, texts = lab.shown()
        assert item_id == "train-0"
        assert XSS in texts and XSS_IMG in texts
        assert page.locator(".card .text", has_text=XSS).text_content() == XSS
        assert page.locator(".card img, .card b, .card script, #prompt *").count() == 0
        assert "policy" not in page.content() and "ppo@" not in page.content()
        lab.drag(0, 1)
        lab.drag(1, 0)
        lab.drag(2, 1)  # same row as response 1: a tie
        assert lab.rows() == [1, 0, 1]
        assert page.locator(".tier.tie").count() == 1
        lab.expect([1, 0, 1])
        page.click("#submit")
        lab.wait_count(1)

        # Item 2, by mouse, with a reload half way: the order and the placements survive.
        item2, texts2 = lab.shown()
        assert item2 != item_id
        lab.drag(2, 0)
        lab.drag(0, 1)
        assert page.is_disabled("#submit")  # response 2 is still unranked
        page.reload()
        page.wait_for_selector("#work:not([hidden]) .card")
        assert lab.shown() == (item2, texts2)
        assert lab.rows() == [1, -1, 0]
        lab.wait_count(1)
        lab.drag(1, 2)
        lab.expect([1, 2, 0])
        page.click("#submit")
        lab.wait_count(2)

        # Item 3, by mouse: into a row, back to the pool, into a lower row (gaps do not count).
        lab.drag(1, 0)
        lab.drag(0, 0)
        if os.environ.get("LABELING_SCREENSHOT"):  # a tie, and one response still to place
            page.screenshot(path=os.environ["LABELING_SCREENSHOT"], full_page=True)
        lab.drag(2, 1)
        lab.drag(2, None)
        assert lab.rows() == [0, 0, -1]
        lab.drag(2, 2)
        lab.expect([0, 0, 1])
        page.click("#submit")
        lab.wait_count(3)

        # Item 4, by keyboard: 3 first, then 1, then 2 tied with 1; take 2 back; 2 below.
        item4, _ = lab.shown()
        kb = page.keyboard
        kb.press("3")
        kb.press("1")
        kb.press("Shift+Digit2")
        assert lab.rows() == [1, 1, 0]
        kb.press("Backspace")
        kb.press("2")
        assert lab.rows() == [1, 2, 0]
        kb.press("Enter")
        lab.wait_count(4)
        # ... then undo it: it comes back as submitted; start over and rank it 1, 2, 3.
        kb.press("u")
        lab.wait_count(3)
        assert lab.shown()[0] == item4
        assert lab.rows() == [1, 2, 0]
        kb.press("Escape")
        assert lab.rows() == [-1, -1, -1]
        for key in ("1", "2", "3"):
            kb.press(key)
        lab.expect([0, 1, 2])
        kb.press("Enter")
        lab.wait_count(4)

        # Item 5 is skipped with S; item 6 by keyboard: 2 and 3 tied best, then 1.
        skipped, _ = lab.shown()
        kb.press("s")
        page.wait_for_function("() => document.getElementById('my-count').textContent"
                               ".includes('1 skipped')")
        assert lab.shown()[0] != skipped
        kb.press("2")
        kb.press("Shift+3")
        kb.press("1")
        assert lab.rows() == [1, 0, 0]
        lab.expect([1, 0, 0])
        kb.press("Enter")
        lab.wait_count(5)
        assert page.locator("#progress").get_attribute("value") == "5"

        page.goto(srv.url + "/agreement")
        page.wait_for_selector("#labelers tbody tr")
        cells = page.locator("#labelers tbody tr").first.locator("td").all_text_contents()
        assert cells[:3] == ["alice", "5", "1"]
        assert dialogs == []

        assert main(["export", str(tmp_path / "to_label"), "--out", str(tmp_path / "out")]) == 0
    finally:
        srv.stop()
    records = comparisons.read_comparisons(tmp_path / "out" / "train.jsonl")
    got = {r["id"]: r["ranks"] for r in records}
    assert got == lab.expected
    assert len(got) == 5 and skipped not in got
    assert all(r["labeler"] == "alice" for r in records)
    assert comparisons.import_rankings(tmp_path / "out" / "train.jsonl") == records


def test_token_link_signs_the_labeler_in_and_leaves_the_address_bar(tmp_path, browser_page):
    page = browser_page
    write_items(tmp_path / "to_label")
    with LabelStore(tmp_path / "db.sqlite") as store:
        load_sources(store, tmp_path / "to_label")
        tokens = {"ann-token-0123456789": "ann"}
        with ThreadServer(create_app(store, tokens=tokens)) as srv:
            page.goto(srv.url + "/?token=ann-token-0123456789")
            page.wait_for_selector("#work:not([hidden]) .card")
            assert page.text_content("#labeler-name") == "ann"
            assert "token" not in page.url
            assert page.is_hidden("#change-name")
            page.reload()  # the token is remembered by the browser
            page.wait_for_selector("#work:not([hidden]) .card")
            assert page.text_content("#labeler-name") == "ann"
            page.goto(srv.url + "/?token=not-a-valid-token-0000")
            page.wait_for_selector("#login:not([hidden]) #token-missing:not([hidden])")
            assert page.is_hidden("#work")
