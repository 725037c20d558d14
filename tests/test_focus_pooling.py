"""`--pooling focus`: every photo, query and gallery alike, pooled over the cells `focus_weights` picks.

The same pooling on both sides keeps what a whole-photo search promises (an indexed photo finds itself at
score 1) while comparing the objects that stand out rather than the backgrounds that fill the photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from retrieval.boxes import AUTO
from retrieval.encoder import load_encoder
from retrieval.modelspec import ModelSpec
from retrieval.pooling import explained_feature_map, pool_feature_map
from tests.conftest import copy_home, draw_picture, run_json


def test_focus_pooling_is_the_mean_of_the_map_over_the_focus_cells():
    """Oracle: z is the mean of A over the cells `forward_features_and_focus` keeps; the explained map is zero
    elsewhere and averages to z; `auto` on a focus encoder changes nothing, a box overrides the focus."""
    encoder = load_encoder(ModelSpec("toy", input_size=64, pooling="focus"))
    plain = load_encoder(ModelSpec("toy", input_size=64))
    image = draw_picture(7, size=96)
    full_map, focus = encoder.forward_features_and_focus(encoder.preprocess(image)[None])
    kept = focus[0] > 0
    assert 0 < kept.sum() < kept.numel()
    maps, pooled = encoder.encode([image, image, image], boxes=[None, AUTO, (24, 12, 72, 60)])
    assert torch.allclose(pooled[0], full_map[0][:, kept].mean(dim=1), atol=1e-5)
    assert torch.count_nonzero(maps[0][:, ~kept]) == 0
    assert torch.allclose(maps.mean(dim=(-2, -1)), pooled, atol=1e-5)
    assert torch.equal(pooled[1], pooled[0]) and torch.equal(maps[1], maps[0])
    assert torch.allclose(pooled[2], plain.encode([image], boxes=[(24, 12, 72, 60)])[1][0], atol=1e-6)


def test_the_indexer_s_batch_path_pools_as_encode_does():
    encoder = load_encoder(ModelSpec("toy", input_size=64, pooling="focus"))
    images = [draw_picture(seed) for seed in range(3)]
    explained, pooled = encoder.embed_batch(torch.stack([encoder.preprocess(im) for im in images]))
    maps, expected = encoder.encode(images)
    torch.testing.assert_close(pooled, expected)
    torch.testing.assert_close(explained, maps)
    torch.testing.assert_close(encoder.pooled(torch.stack([encoder.preprocess(im) for im in images])), expected)


def test_focus_pooling_needs_the_focus_weights_of_the_same_pass():
    with pytest.raises(ValueError, match="focus pooling needs"):
        pool_feature_map(torch.rand(1, 4, 3, 3), "focus")
    with pytest.raises(ValueError, match="focus pooling needs"):
        explained_feature_map(torch.rand(1, 4, 3, 3), "focus")


@pytest.fixture
def focus_home(gallery, home, gallery_template, index_template):
    """The drawn gallery indexed with `--pooling focus` (a copy of the session's template)."""
    template_home, _ = index_template(gallery_template, "--pooling", "focus")
    return copy_home(template_home, gallery_template, gallery, home)


def test_every_indexed_photo_finds_itself_first_at_score_one(capsys, gallery, focus_home):
    for picture in sorted(gallery.rglob("pic*")):
        _, result = run_json(capsys, "search", picture, "--home", focus_home, "-k", "1", "--explain", "none")
        top = result["results"][0]
        assert top["path"].endswith(picture.name) and top["score"] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.slow
def test_with_the_bundled_backbone_a_whole_photo_finds_the_pasted_photo_not_the_texture():
    """Five skimage photos, each pasted small (5 % of the area) onto two of three textures (the gallery); each
    query pastes one onto the texture its gallery copies lack, which other photos' copies share. Under GAP
    the texture wins; under focus pooling the pasted photo does."""
    from skimage import data

    photos, textures = ["chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field"], ["grass", "brick", "gravel"]

    def scene(photo: str, texture: str, corner: tuple[int, int]) -> Image.Image:
        canvas = Image.fromarray(getattr(data, texture)()).convert("RGB").resize((448, 448))
        canvas.paste(Image.fromarray(getattr(data, photo)()).convert("RGB").resize((110, 96)), corner)
        return canvas

    gallery = [(photo, texture) for i, photo in enumerate(photos) for texture in textures if texture != textures[i % 3]]
    hits = {}
    for pooling in ("gap", "focus"):
        encoder = load_encoder(ModelSpec(input_size=224, pooling=pooling))
        rows = F.normalize(encoder.encode([scene(*pair, (260, 40)) for pair in gallery])[1], dim=1)
        queries = F.normalize(
            encoder.encode([scene(photo, textures[i % 3], (40, 250)) for i, photo in enumerate(photos)])[1], dim=1
        )
        hits[pooling] = sum(gallery[j][0] == photo for j, photo in zip((queries @ rows.T).argmax(1).tolist(), photos))
    assert hits["focus"] >= 4 and hits["gap"] <= 2, hits


def test_fam_exact_sums_to_the_score_on_both_sides_and_stays_on_the_focus_cells(capsys, gallery, focus_home):
    from retrieval.config import Settings
    from retrieval.engine import QueryEngine

    engine = QueryEngine(Settings(home=focus_home), device="cpu")
    try:
        image = engine.load_query(gallery / "pic2.jpg")
        result = engine.query(image, 3, "fam-exact")
        outside = ~engine.focus_cells(image)
        assert outside.any()
        for match in result.matches:
            assert match.query_map.sum() + match.offsets["query"] == pytest.approx(match.score, abs=1e-4)
            assert match.match_map.sum() + match.offsets["match"] == pytest.approx(match.score, abs=1e-4)
            assert np.count_nonzero(match.query_map[outside]) == 0
    finally:
        engine.close()
