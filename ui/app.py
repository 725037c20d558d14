"""famsearch UI: search the index by example photo and see why each match came back.

Layout only: the engine (retrieval.engine.QueryEngine, shared with the CLI) does the work,
ui.queries vets what a person hands in and ui.pictures draws. Run with `famsearch ui`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from retrieval import correspondences
from retrieval.config import DEFAULT_DUPLICATE_THRESHOLD, DEFAULT_EXPLAINER, QUERY_THREADS, Settings
from retrieval.duplicates import KEEP_RULE, DuplicateGroup
from retrieval.engine import Match, QueryEngine
from retrieval.errors import (
    DamagedStateError,
    FamsearchError,
    IndexMissingError,
    ModelMismatchError,
    NoAlbumsError,
    UsageError,
)
from retrieval.fam import EXPLAINERS
from retrieval.images import ImageError, decode_image
from ui import login, pictures, queries
from ui.state import memo

PICK, UPLOAD, TYPE = "Pick an indexed photo", "Upload a photo", "Type a path"
SEARCH, DUPLICATES, STATUS = "Search", "Duplicates", "Index status"
PAGES = [SEARCH, DUPLICATES, STATUS]
GRID_COLUMNS = 5
MAX_GROUPS_SHOWN = 30  # groups drawn on the Duplicates page; `famsearch duplicates --json` lists them all


@st.cache_resource(max_entries=2, show_spinner="Loading the model and the index…")
def load_engine(home: str, db_url: str | None, stamp: int | None) -> QueryEngine:
    """One engine per index version, shared by every session (read-only after loading)."""
    return queries.warm_up(QueryEngine(Settings(Path(home), db_url), threads=QUERY_THREADS))


@st.cache_data(max_entries=2048, show_spinner=False)
def grid_thumbnail(_engine: QueryEngine, image_id: int, stamp: int | None):
    """ImageError (not cached) while the photo's file is gone or changed since it was indexed."""
    return queries.padded_thumbnail(_engine.photo_bytes(image_id))


@st.cache_data(max_entries=64, show_spinner=False)
def match_photo(_engine: QueryEngine, image_id: int, stamp: int | None):
    photo = decode_image(_engine.photo_bytes(image_id), draft_size=queries.DISPLAY_SIDE)[0]
    return pictures.fit_within(photo, queries.DISPLAY_SIDE)


def select(rank: int | None) -> None:
    st.session_state.selected = rank


def search_for(path: str) -> None:
    """ "More like this": an indexed photo becomes the query, picked by its path (the name filter set to the whole
    path, so it is among the options), the whole photo, on the Search page's grid."""
    st.session_state.page = SEARCH
    st.session_state.source = PICK
    st.session_state.pick_filter = path
    st.session_state.pick = path
    st.session_state.selected = None
    for key in ("box_x", "box_y", "box_auto"):  # back to the whole photo: the widgets take their defaults
        st.session_state.pop(key, None)


def more_like_this(path: str, key: str) -> None:
    st.button(
        "More like this", key=key, on_click=search_for, args=(path,), width="stretch", help="Search with this photo"
    )


def show_no_index(settings: Settings, reason: str) -> None:
    st.title("famsearch")
    st.warning(f"Nothing to search yet: {queries.plain(reason)}")
    st.markdown("Build an index of a photo folder (or of the bundled demo gallery), then reload this page:")
    st.code("\n".join(queries.build_commands(settings.home)), language="bash")


def sidebar() -> dict:
    with st.sidebar:
        st.header("famsearch")
        page = st.radio("Page", PAGES, key="page")
        explainer = st.selectbox(
            "Explainer",
            EXPLAINERS,
            index=EXPLAINERS.index(DEFAULT_EXPLAINER),
            key="explainer",
            help="\n\n".join(f"**{k}**: {v}" for k, v in queries.EXPLAINER_HELP.items()),
        )
        k = st.slider("Matches (k)", 1, 50, 10, key="k")
        group = st.toggle(
            "Group map over the top-k",
            key="group",
            help="The query's map against all top-k matches at once (Eq. 11/15)",
        )
        opacity = st.slider("Heatmap opacity", 0.0, 1.0, 0.5, 0.05, key="opacity")
        filters = filter_fields()
    return {"page": page, "explainer": explainer, "k": k, "group": group, "opacity": opacity, "filters": filters}


def filter_fields() -> tuple:
    """The search filters as typed (`famsearch search --in/--after/--before/--camera/--min-score`)."""
    with st.expander("Filters", expanded=False):
        st.caption("The top-k among the photos that pass. Dates: EXIF date taken, else the file's date.")
        folder = st.text_input("In folder", key="filter_in", placeholder="/absolute/path (and its sub-folders)")
        after = st.date_input("Taken on or after", value=None, key="filter_after", format="YYYY-MM-DD")
        before = st.date_input("Taken on or before", value=None, key="filter_before", format="YYYY-MM-DD")
        camera = st.text_input("Camera make or model contains", key="filter_camera")
        min_score = st.number_input(
            "Minimum score", min_value=-1.0, max_value=1.0, value=None, step=0.05, key="filter_min_score"
        )
    return folder.strip() or None, after, before, camera.strip() or None, min_score


def query_photo(engine: QueryEngine) -> queries.QueryPhoto | None:
    source = st.radio("Query by", [PICK, UPLOAD, TYPE], horizontal=True, key="source")
    try:
        if source == PICK:
            left, right = st.columns([1, 3])
            contains = left.text_input("Filter by name", key="pick_filter", placeholder="e.g. cat")
            paths = [path for _, path in engine.indexed_paths(contains)]
            path = right.selectbox("Indexed photo", paths, index=None, key="pick", placeholder="Choose a photo")
            return queries.read_indexed(Path(path), engine.encoder.input_size, engine) if path else None
        if source == UPLOAD:
            uploaded = st.file_uploader(
                f"Photo (up to {queries.MAX_UPLOAD_MB} MB)", type=queries.UPLOAD_TYPES, key="upload"
            )
            return (
                queries.read_upload(uploaded.name, uploaded.getvalue(), engine.encoder.input_size) if uploaded else None
            )
        text = st.text_input("Absolute path of a photo inside the indexed folders", key="typed")
        text = text.replace(queries.WORD_JOINER, "")  # a path copied from a caption (queries.plain) still works
        if not text.strip():
            return None
        return queries.read_indexed(engine.resolve_user_path(text), engine.encoder.input_size, engine)
    except (FamsearchError, OSError) as error:  # ImageError: not a photo; UsageError: a path outside the index
        st.error(queries.plain(str(error)))  # it quotes the upload name or the typed path
        return None


def query_region(focus_index: bool) -> queries.Region | str | None:
    """The part of the query photo to search for: fractions from two range sliders, `queries.AUTO` (the
    automatic focus), or None: all of it (under focus pooling: the part that stands out, as for every photo)."""
    with st.expander("Search for part of the photo"):
        st.caption("Narrow the query to the object you mean: the rest of the photo then no longer counts.")
        if focus_index:  # every photo is already pooled over its focus: `auto` would change nothing
            st.caption(
                "This index compares every photo by the part that stands out from the rest of it (focus "
                "pooling; lit on the query). Frame a part to search for that instead."
            )
            auto = False
        else:
            auto = st.checkbox(
                "Pick the part automatically (what stands out from the rest of the photo)", key="box_auto"
            )
        x_range = st.slider("Left to right (%)", 0, 100, (0, 100), key="box_x", disabled=auto)
        y_range = st.slider("Top to bottom (%)", 0, 100, (0, 100), key="box_y", disabled=auto)
    return queries.AUTO if auto else queries.region_from_percent(x_range, y_range)


def framer(engine: QueryEngine, photo: queries.QueryPhoto, region):
    """image -> image: the query's part marked on any size of the query photo: a framed box, the automatic
    focus's cells lit (the rest dimmed; also for the whole photo under focus pooling), or nothing for the
    whole photo."""
    if region is None and engine.encoder.pooling != "focus":
        return lambda image: image
    if region is not None and region != queries.AUTO:
        return lambda image: pictures.outline(image, region)
    return lit_cells(engine, "focus_cells", (photo.digest, engine.encoder.input_size), lambda: photo.image)


def match_framer(engine: QueryEngine, match, stamp: int | None):
    """image -> image: on a focus index, the match's own compared cells lit (the rest dimmed), as on the query;
    elsewhere nothing (a match is always pooled whole)."""
    if engine.encoder.pooling != "focus":
        return None
    return lit_cells(
        engine,
        "match_cells",
        (match.image_id, stamp, engine.encoder.input_size),
        lambda: decode_image(engine.photo_bytes(match.image_id), draft_size=engine.encoder.input_size)[0],
    )


def lit_cells(engine: QueryEngine, name: str, key: tuple, image):
    """image -> image with the focus cells of the photo ``image()`` lit: the cells are computed once per
    ``key`` and kept in session state under ``name``."""
    cells = memo(name, key, lambda: engine.focus_cells(image()))
    return lambda picture: pictures.spotlight(picture, cells)


def show_query(photo: queries.QueryPhoto, result, opacity: float, region, frame, focus_index: bool) -> None:
    if region is None:
        part = " (compared by the part that stands out: lit)" if focus_index else ""
    else:
        part = " (the part picked automatically: lit)" if region == queries.AUTO else " (the framed part)"
    st.markdown("**Query**" + part)
    if result.group_map is None:
        st.image(frame(pictures.fit_within(photo.display, 512)), caption=queries.plain(photo.label), width="stretch")
        return
    drawn = frame(pictures.heat_overlay(photo.display, result.group_map, opacity, 512))
    st.image(drawn, caption="Group map: what all these matches have in common with it", width="stretch")
    mean_score = float(np.mean([m.score for m in result.matches]))  # what the group map explains (Eq. 11)
    shares = pictures.score_shares(result.group_map, drawn.size, mean_score, result.explainer == "fam-exact")
    st.image(pictures.colour_scale(*shares))
    st.download_button(
        "Download group map (PNG)",
        lambda: pictures.png_bytes(drawn),
        "group_map.png",
        "image/png",
        on_click="ignore",
        key="dl_group",
    )


def show_grid(engine: QueryEngine, result, stamp: int | None) -> None:
    timing = queries.timing_text(result.timing_ms, result.group_map is not None)
    st.markdown(f"**Top {len(result.matches)}** · {timing} · click **Why?** for the maps")
    for start in range(0, len(result.matches), GRID_COLUMNS):
        for column, match in zip(st.columns(GRID_COLUMNS), result.matches[start : start + GRID_COLUMNS]):
            caption = f"#{match.rank} · {match.score:.3f} · {queries.plain(queries.short_name(match.path))}"
            try:
                thumbnail, gone = grid_thumbnail(engine, match.image_id, stamp), False
            except ImageError as error:  # deleted or changed since indexing: marked, the others still shown
                thumbnail, gone = queries.missing_tile(), True
                caption += f" · {queries.plain(str(error))}"
            with column:
                st.image(thumbnail, caption=caption)
                st.button(
                    "Why?", key=f"why_{match.rank}", on_click=select, args=(match.rank,), width="stretch", disabled=gone
                )
                if not gone:
                    more_like_this(match.path, f"more_{match.rank}")


def show_overlay(
    column, title: str, image, heatmap, opacity: float, filename: str, score: float, additive: bool, frame=None
) -> None:
    """One photo's map over it, its colour scale (shares of the score, `pictures.score_shares`), a download."""
    drawn = pictures.heat_overlay(image, heatmap, opacity)
    drawn = frame(drawn) if frame else drawn
    with column:
        st.image(drawn, caption=title, width="stretch")
        st.image(pictures.colour_scale(*pictures.score_shares(heatmap, drawn.size, score, additive)))
        st.download_button(
            f"Download {filename}",
            lambda: pictures.png_bytes(drawn),
            filename,
            "image/png",
            on_click="ignore",
            key=f"dl_{filename}",
        )


def show_why(
    engine: QueryEngine,
    photo,
    match,
    settings: dict,
    stamp: int | None,
    region,
    frame,
    heading: str | None = None,
    back: tuple = ("← All results", select, (None,)),
    sides: tuple[str, str] | None = None,
) -> None:
    """The Why? view of one match: both maps, the channels that carried the score; ``back``: (label, callback,
    its args) of the button that leaves it; ``sides``: the captions of the two maps."""
    explainer = settings["explainer"]
    try:
        photo_of_match = match_photo(engine, match.image_id, stamp)
    except ImageError as error:  # gone or changed since it was indexed (and since the grid was drawn)
        st.button("← All results", on_click=select, args=(None,), key="back")
        st.error(queries.plain(str(error)))
        return
    report = memo(
        "report",
        (photo.digest, match.image_id, explainer, stamp, region),
        lambda: engine.compare_indexed(
            photo.image, match.image_id, explainer, queries.box_on(region, photo.image.size)
        ),
    )
    label, on_back, back_args = back
    left, right = st.columns([3, 1])
    left.button(label, on_click=on_back, args=back_args, key="back")
    with right:
        more_like_this(match.path, "more_why")
    st.subheader(heading or f"Why #{match.rank} matched: score {match.score:.4f}")
    st.caption(f"{explainer}: {queries.EXPLAINER_HELP[explainer]}. {queries.plain(match.path)}")
    if explainer == "fam-exact":
        st.caption(
            f"Each map sums to the score minus its offset (query {report.offsets['first']:+.4f}, "
            f"match {report.offsets['second']:+.4f}; from the head's bias)."
        )
    left, right = st.columns(2)
    additive = explainer == "fam-exact"  # its cells carry the score itself (`pictures.score_shares`)
    show_overlay(
        left,
        sides[0] if sides else "Query: where it resembles the match",
        photo.display,
        report.first_map,
        settings["opacity"],
        f"query_rank{match.rank}_{explainer}.png",
        report.score,
        additive,
        frame,
    )
    show_overlay(
        right,
        sides[1] if sides else f"Match #{match.rank}: where it resembles the query",
        photo_of_match,
        report.second_map,
        settings["opacity"],
        f"match_rank{match.rank}_{explainer}.png",
        report.score,
        additive,
        match_framer(engine, match, stamp),
    )
    show_correspondences(photo.display, photo_of_match, report.correspondences, match.rank)
    st.markdown("#### Channels that carried the score")
    rows = queries.channel_rows(report.shares, 15)
    st.bar_chart(
        pd.DataFrame(rows), x="channel", y="share of the score", horizontal=True, sort="-share of the score", height=380
    )
    st.caption(
        f"Each channel's share of the cosine on the query's side: z_n·(W ê)_n/‖e‖. All "
        f"{len(report.shares)} shares sum to {report.shares.sum():.4f} (score {report.score:.4f}, "
        f"minus the head bias' part)."
    )
    channel = st.selectbox(
        "Show a channel's activation map",
        [row["channel"] for row in rows],
        index=None,
        key="channel",
        placeholder="Choose a channel",
    )
    if channel:
        n = int(channel.lstrip("#"))
        a, b = st.columns(2)
        a.image(
            pictures.heat_overlay(photo.display, report.first_activations[n], settings["opacity"], 384),
            caption=f"Channel {channel} on the query",
            width="stretch",
        )
        b.image(
            pictures.heat_overlay(photo_of_match, report.second_activations[n], settings["opacity"], 384),
            caption=f"Channel {channel} on match #{match.rank}",
            width="stretch",
        )


def show_correspondences(query_image, match_image, pairs: np.ndarray, rank: int) -> None:
    """The matched parts as lines from the query to the match, the strongest brightest (`retrieval.correspondences`)."""
    st.markdown("#### Matched parts")
    if not len(pairs):
        st.caption("No part of the query's salient cells found its counterpart here: the match rests on the whole.")
        return
    st.image(
        correspondences.draw(query_image, match_image, pairs),
        caption=f"The {len(pairs)} strongest matched cells (stride-16 features, mutual nearest neighbours that one "
        f"similarity transform explains) between the query (left) and match #{rank} (right); brighter = stronger",
        width="stretch",
    )


# ---------------------------------------------------------------------------- album decision (docs/fewshot.md)
def show_album_decision(
    engine: QueryEngine, photo: queries.QueryPhoto, settings: dict, stamp: int | None, region, frame
) -> None:
    """Which album the query (or its framed part) would go to (Eq. 11) rather than the runner-up, with the
    winner's group map (Eq. 15)."""

    def decide():
        try:
            return engine.classify(
                photo.image, "mean", explainer=settings["explainer"], box=queries.box_on(region, photo.image.size)
            )
        except NoAlbumsError:
            return None

    decision = memo("album_decision", (photo.digest, settings["explainer"], stamp, region), decide)
    if decision is None:
        st.caption(
            "Label albums (`famsearch albums --from-folders PHOTO_FOLDER`) to see which one this photo would go to."
        )
        return
    win, second = decision.winner, decision.runner_up
    album = queries.plain(win.album)  # album labels come from folder names
    line = f"This {'part of the photo' if region else 'photo'} would go to **{album}** ({win.score:.2f})"
    if second is not None:
        line += f" rather than **{queries.plain(second.album)}** ({second.score:.2f})"
    st.markdown(
        line + f", because the highlighted parts resemble its {len(win.image_ids)} photo(s) on average "
        "(mean cosine, Eq. 11)."
    )
    if decision.winner_map is not None:
        drawn = pictures.heat_overlay(photo.display, decision.winner_map, settings["opacity"], 512)
        st.image(
            frame(drawn),
            caption=f"Why {album}: {settings['explainer']} against the album (Eq. 15)",
            width="stretch",
        )


def search_page(engine: QueryEngine, settings: dict, stamp: int | None) -> None:
    st.title("Search by example photo")
    photo = query_photo(engine)
    if photo is None:
        st.info("Pick, upload or type a photo to find the indexed photos most like it.")
        return
    focus_index = engine.encoder.pooling == "focus"
    try:
        region = query_region(focus_index)
    except UsageError as error:  # a part with no width or height
        st.warning(str(error))
        return
    try:
        search_filter = queries.search_filter(*settings["filters"])
    except UsageError as error:  # a folder that is not there, a date range that holds no day
        st.warning(queries.plain(str(error)))
        return
    request = queries.grid_request(settings["k"], settings["explainer"], settings["group"])
    key = (photo.digest, region, stamp, *request.values(), search_filter)
    if st.session_state.get("result_key", (None,))[:2] != key[:2]:  # another photo or part: back to the grid
        st.session_state.selected = None
    box = queries.box_on(region, photo.image.size)
    result = memo("result", key, lambda: engine.query(photo.image, **request, box=box, search_filter=search_filter))
    if not result.matches:
        st.warning(
            "No indexed photo passes the filters." if search_filter else "The index holds no photos to compare with."
        )
        return
    left, right = st.columns([1, 4])
    with left:
        frame = framer(engine, photo, region)
        show_query(photo, result, settings["opacity"], region, frame, focus_index)
        show_album_decision(engine, photo, settings, stamp, region, frame)  # which album, and why (docs/fewshot.md)
    with right:
        selected = st.session_state.get("selected")
        if selected is None or selected > len(result.matches):
            show_grid(engine, result, stamp)
        else:
            show_why(engine, photo, result.matches[selected - 1], settings, stamp, region, frame)


# ---------------------------------------------------------------------------- near-duplicates (famsearch duplicates)
def open_pair(pair: tuple[int, int] | None) -> None:
    """Open the Why? view of (keep id, image id) on the Duplicates page, or go back to the groups (None)."""
    st.session_state.dup_pair = pair


def show_group(engine: QueryEngine, group: DuplicateGroup, stamp: int | None) -> None:
    """One group as rows of thumbnails, the keep first; each other photo's Why? compares it with the keep."""
    keep = group.keep
    st.markdown(
        f"**Group {group.number}** · {len(group.images)} photos · keep: {queries.plain(queries.short_name(keep.path))}"
    )
    for start in range(0, len(group.images), GRID_COLUMNS):
        for column, image in zip(st.columns(GRID_COLUMNS), group.images[start : start + GRID_COLUMNS]):
            with column:
                label = "keep" if image is keep else f"{image.score:.3f}"
                caption = f"{label} · {queries.plain(queries.short_name(image.path))}"
                try:
                    thumbnail = grid_thumbnail(engine, image.image_id, stamp)
                except ImageError as error:  # deleted or changed since indexing: marked, the others still shown
                    thumbnail, caption = queries.missing_tile(), f"{caption} · {queries.plain(str(error))}"
                st.image(thumbnail, caption=caption)
                if image is not keep:
                    pair = (keep.image_id, image.image_id)
                    st.button("Why?", key=f"dup_why_{group.number}_{image.image_id}", on_click=open_pair, args=(pair,))
                more_like_this(image.path, f"dup_more_{image.image_id}")


def show_pair(engine: QueryEngine, group: DuplicateGroup, position: int, settings: dict, stamp: int | None) -> None:
    """The Why? view of one photo of a group against the group's keep (the keep in the query's place)."""
    keep, image = group.keep, group.images[position]
    try:
        photo = memo(
            "dup_keep",
            (keep.path, stamp),
            lambda: queries.read_indexed(Path(keep.path), engine.encoder.input_size, engine),
        )
    except (FamsearchError, OSError) as error:  # the file went away since it was indexed
        st.error(queries.plain(str(error)))
        st.button("← All groups", on_click=open_pair, args=(None,), key="back")
        return
    name, kept = (queries.plain(f"{Path(p).parent.name}/{queries.short_name(p)}") for p in (image.path, keep.path))
    show_why(
        engine,
        photo,
        Match(position + 1, image.image_id, image.path, image.score),
        settings,
        stamp,
        None,
        framer(engine, photo, None),
        heading=f"Why {name} is a near-duplicate of {kept} (the keep): score {image.score:.4f}",
        back=("← All groups", open_pair, (None,)),
        sides=("The keep: where it resembles this photo", "This photo: where it resembles the keep"),
    )


def duplicates_page(engine: QueryEngine, settings: dict, stamp: int | None) -> None:
    st.title("Near-duplicates")
    st.caption(
        "Photos that score at least the threshold against each other are grouped (and groups that share a photo are "
        f"one). In each group the one to keep is {KEEP_RULE}. Nothing is deleted: this only shows them "
        "(`famsearch duplicates --json` lists every group)."
    )
    threshold = st.slider(
        "Threshold (cosine)",
        0.70,
        1.00,
        DEFAULT_DUPLICATE_THRESHOLD,
        0.01,
        key="dup_threshold",
        help="Lower finds more edited copies but also mistakes look-alike photos for copies "
        f"(default {DEFAULT_DUPLICATE_THRESHOLD}: bench/results/duplicates.txt)",
    )
    groups = memo("dup_groups", (stamp, threshold), lambda: engine.duplicates(threshold))
    keep_id, image_id = st.session_state.get("dup_pair") or (None, None)
    for group in groups:  # a pair the threshold has since split shows the groups again
        ids = [image.image_id for image in group.images]
        if group.keep.image_id == keep_id and image_id in ids:
            show_pair(engine, group, ids.index(image_id), settings, stamp)
            return
    if not groups:
        st.info(f"No two photos score {threshold:.2f} or more: no near-duplicates at this threshold.")
        return
    shown = groups[:MAX_GROUPS_SHOWN]
    more = f" (the first {len(shown)} shown)" if len(groups) > len(shown) else ""
    photos = sum(len(group.images) for group in groups)
    count = f"{len(groups)} group" + ("s" if len(groups) > 1 else "")
    st.markdown(f"**{count}** of {photos} photos{more} · click **Why?** to see what a photo shares with its keep")
    for group in shown:
        show_group(engine, group, stamp)
        st.divider()


def status_page(engine: QueryEngine) -> None:
    st.title("Index status")
    status = engine.status()
    images, failed, vectors, kind = st.columns(4)
    images.metric("Images indexed", status["images"])
    failed.metric("Failed files", status["failed"])
    vectors.metric("Vectors in the index", status["vectors"])
    kind.metric("Index type", status["index_type"])
    st.caption(f"Home: {queries.plain(str(status['home']))}")
    st.subheader("Model")
    st.dataframe(pd.DataFrame(queries.key_value_rows(status["model"])), hide_index=True)
    st.subheader("Last run")
    if status["last_run"]:
        st.dataframe(pd.DataFrame(queries.key_value_rows(status["last_run"])), hide_index=True)
    else:
        st.write("No run recorded.")
    st.subheader("Failed files")
    if status["failures"]:
        st.dataframe(pd.DataFrame(status["failures"]), hide_index=True)
    else:
        st.success("No file failed.")
    st.button("Reload the index", on_click=load_engine.clear, help="After `famsearch index` ran again")


def main() -> None:
    st.set_page_config(page_title="famsearch", page_icon="🔎", layout="wide")
    if not login.logged_in():  # served beyond this machine: nothing but the login form until the password
        return
    settings = sidebar()
    env = queries.settings_from_env()
    try:
        stamp = queries.index_stamp(env)
        engine = load_engine(str(env.home), env.db_url, stamp)
    except IndexMissingError as error:
        show_no_index(env, str(error))
        return
    except (ModelMismatchError, UsageError, DamagedStateError) as error:  # another model's, a damaged file
        st.error(f"The index cannot be opened: {queries.plain(str(error))}")
        return
    if settings["page"] == STATUS:
        status_page(engine)
    elif settings["page"] == DUPLICATES:
        duplicates_page(engine, settings, stamp)
    else:
        search_page(engine, settings, stamp)


if __name__ == "__main__":  # `streamlit run` and AppTest run the script as __main__; importing it draws nothing
    main()
