"""`model=embedded_wide`: the embedded pair with its LM head padded to a realistic width.

The wide pair is the narrow one padded (`embedded.widen`): every logits tensor gets the full width,
but the padded ids carry ~0 probability, so the models behave as before."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import TINY_PAIR, compose


@pytest.mark.integration  # prepares (trains) the tiny pair, then widens it
def test_wide_pair_is_the_narrow_pair_padded(tiny_pair):
    from tipdistill import embedded
    from tipdistill.config import validate
    from tipdistill.models import resolve_pair

    narrow_student, _, _ = tiny_pair
    cfg = validate(compose(["model=embedded_wide", *TINY_PAIR, "model.embedded.vocab_pad_to=1024"]))
    student, teacher = resolve_pair(cfg)
    report = json.loads((Path(student).parent / "prepare.json").read_text())
    assert report["student"]["widened_from"] == Path(narrow_student).parent.name
    assert report["student"]["extra_id_mass_max_held_out"] < 1e-2 and report["teacher"]["extra_id_mass_max_held_out"] < 1e-2

    tok = embedded.build_tokenizer()
    wide, narrow = AutoModelForCausalLM.from_pretrained(student), AutoModelForCausalLM.from_pretrained(narrow_student)
    assert wide.config.vocab_size == 1024 and narrow.config.vocab_size == len(tok)
    ids = torch.tensor([tok.encode("Q:123+45=?A:", add_special_tokens=False)])
    with torch.no_grad():
        lw, ln = wide(ids).logits[0], narrow(ids).logits[0]
    assert lw.shape[-1] == 1024
    assert torch.allclose(lw[:, : len(tok)], ln, atol=1e-5)  # the real ids are untouched
    assert torch.equal(lw.argmax(-1), ln.argmax(-1))  # greedy decoding unchanged
