"""Localisation scores on closed-form maps (no model needed)."""
import torch

from interp.testbed.localize import (all_objects_maps, energy_in_box, localisation_items, occlude, pointing_game,
                                     random_maps, score_maps, target_masks)
from interp.testbed.scenes import BACKGROUND


def test_scores_closed_form():
    items = localisation_items(30)
    masks = target_masks(items)
    n_target = masks.sum(1).float()
    # a one-hot map on a target patch hits; on a non-target patch misses
    first_in = masks.float().argmax(1)
    first_out = (~masks).float().argmax(1)
    onehot_in = torch.nn.functional.one_hot(first_in, 64).float()
    onehot_out = torch.nn.functional.one_hot(first_out, 64).float()
    assert pointing_game(onehot_in, masks).eq(1).all() and energy_in_box(onehot_in, masks).eq(1).all()
    assert pointing_game(onehot_out, masks).eq(0).all() and energy_in_box(onehot_out, masks).eq(0).all()
    # a constant map: ties everywhere, so both scores equal |target| / 64
    const = torch.ones(len(items), 64)
    assert torch.allclose(pointing_game(const, masks), n_target / 64)
    assert torch.allclose(energy_in_box(const, masks), n_target / 64)
    # the all-objects map spreads evenly over the objects: both scores = |target| / |all objects|
    allobj = all_objects_maps(items)
    expected = n_target / allobj.sum(1)
    assert torch.allclose(pointing_game(allobj, masks), expected)
    assert torch.allclose(energy_in_box(allobj, masks), expected)
    # negative values carry no energy
    assert torch.allclose(energy_in_box(onehot_in - 5 * onehot_out, masks), torch.ones(len(items)))
    s = score_maps(random_maps(len(items)), masks)
    assert s["pointing_ci"][0] <= s["pointing"] <= s["pointing_ci"][1] and s["n"] == len(items)


def test_occlude_blanks_exactly_the_patch():
    scene = localisation_items(1)[0][0]
    out = occlude(scene.image, [9])  # row 1, col 1
    changed = (out != scene.image).any(0)
    assert not changed[:4].any() and not changed[8:].any() and not changed[:, :4].any() and not changed[:, 8:].any()
    assert torch.allclose(out[:, 4:8, 4:8], torch.tensor(BACKGROUND).view(3, 1, 1).expand(3, 4, 4))
