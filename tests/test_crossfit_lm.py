"""Cross-fitting for causal LMs (issue 13): the user supplies K teachers, teacher k fine-tuned without fold k of the
training blocks. Fold assignment, `kdforge crossfit-split`, the cross-fitted offline cache (every block's top-k or
samples from its fold's teacher, against a direct computation), the refusals, and a short distillation from it."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
import yaml

from kdforge.crossfit import block_folds
from kdforge.errors import KDForgeError

K, SEED, TOP_K, T = 3, 5, 8, 2.0


def one_line(match: str, call) -> str:
    with pytest.raises(KDForgeError, match=match) as err:
        call()
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.fixture(scope="module")
def lm(tiny_assets, tmp_path_factory):
    """K random Llama teachers (different seeds) saved with the tiny tokenizer, one with a larger vocabulary, and a
    cross-fitted recipe over 64 training blocks (not yet cached)."""
    from transformers import AutoTokenizer

    from kdforge.models import tiny_llama

    root = tmp_path_factory.mktemp("crossfit_lm")
    tok = AutoTokenizer.from_pretrained(str(tiny_assets["teacher"]))
    models = []
    for k, vocab in enumerate([len(tok)] * K + [len(tok) + 8]):
        folder = root / f"teacher_{k}"
        tiny_llama(vocab_size=vocab, hidden=32, layers=2, heads=4, seed=100 + k).save_pretrained(folder)
        tok.save_pretrained(folder)
        models.append(str(folder))
    other = AutoTokenizer.from_pretrained(str(tiny_assets["teacher"]))  # one more entry: another tokenizer
    other.add_special_tokens({"additional_special_tokens": ["<sep>"]})
    tiny_llama(vocab_size=len(tok), hidden=32, layers=2, heads=4, seed=99).save_pretrained(root / "other_tok")
    other.save_pretrained(root / "other_tok")
    models.append(str(root / "other_tok"))
    recipe = {
        "seed": 0, "output_dir": str(root / "run"),
        "teacher": {"model": str(tiny_assets["teacher"]), "kind": "cache", "path": str(root / "cache"),
                    "crossfit": {"folds": K, "seed": SEED, "models": models[:K]}},
        "student": {"init": "config", "config": {"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64}},
        "data": {"corpus": str(tiny_assets["train"]), "validation": [str(tiny_assets["val"])], "seq_len": 32,
                 "max_train_tokens": 2048, "max_eval_tokens": 512},
        "objective": [{"loss": "cross_entropy", "weight": 0.5},
                      {"loss": "forward_kl", "weight": 0.5, "temperature": T}],
        "train": {"steps": 3, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "save_every": 0, "log_every": 1},
    }
    return {"root": root, "recipe": recipe, "models": models, "tokenizer": tok}


def with_teacher(recipe: dict, **teacher) -> dict:
    return {**recipe, "teacher": {**recipe["teacher"], **teacher}}


def train_blocks(recipe: dict, tokenizer) -> torch.Tensor:
    from kdforge.data.corpus_blocks import tokenize_corpus
    from kdforge.recipe import parse_recipe

    return tokenize_corpus(parse_recipe(recipe), tokenizer)[0].ids


@pytest.fixture(scope="module")
def crossfit_cache(lm):
    """The recipe's cross-fitted top-8 cache (fp16 values, plain ids: exact enough to compare), built once."""
    from kdforge.recipe import parse_recipe
    from kdforge.teachers.cache import CacheOptions, cache_recipe_teacher

    path, index = cache_recipe_teacher(parse_recipe(lm["recipe"]), options=CacheOptions(
        k=TOP_K, values="fp16", ids="plain", lse_dtype="float32", temperature=T, shard_blocks=8, batch_size=8))
    return path, index


def test_block_folds_are_a_seeded_balanced_partition():
    folds = block_folds(50, 4, seed=3)
    # the definition, computed directly: the blocks in a seeded numpy permutation, dealt round-robin
    expected = np.empty(50, dtype=np.int64)
    expected[np.random.default_rng(3).permutation(50)] = np.arange(50) % 4
    assert folds.tolist() == expected.tolist()
    assert torch.equal(folds, block_folds(50, 4, seed=3)) and not torch.equal(folds, block_folds(50, 4, seed=4))
    assert sorted(torch.bincount(folds).tolist()) == [12, 12, 13, 13]  # a partition, sizes within one
    for bad in (1, 0, 51, True, 2.5):
        one_line(rf"teacher.crossfit.folds={bad!r} must be an integer from 2 up to the 50 training blocks",
                 lambda: block_folds(50, bad))


def test_crossfit_split_writes_what_each_teacher_may_see(lm, tmp_path):
    from typer.testing import CliRunner

    from kdforge.cli import app

    # the split comes first, before any teacher exists: a recipe without crossfit.models
    recipe = with_teacher(lm["recipe"], crossfit={"folds": K, "seed": SEED})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "split"
    result = CliRunner().invoke(app, ["crossfit-split", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    blocks = train_blocks(recipe, lm["tokenizer"])
    folds = block_folds(len(blocks), K, seed=SEED).tolist()
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["folds"], manifest["seed"], manifest["n_blocks"]) == (K, SEED, len(blocks)) == (K, SEED, 64)
    assert manifest["data_sha256"] == hashlib.sha256(blocks.numpy().tobytes()).hexdigest()
    assert manifest["fold_sizes"] == [folds.count(k) for k in range(K)]
    for k in range(K):
        for name, in_file in ((f"teacher_{k}.jsonl", lambda f: f != k), (f"fold_{k}.jsonl", lambda f: f == k)):
            body = (out / name).read_bytes()
            records = [json.loads(line) for line in body.decode().splitlines()]
            assert [r["block"] for r in records] == [i for i, f in enumerate(folds) if in_file(f)]
            assert all(r["text"] == lm["tokenizer"].decode(blocks[r["block"]], skip_special_tokens=False,
                                                           clean_up_tokenization_spaces=False) for r in records)
            assert manifest["files"][name]["sha256"] == hashlib.sha256(body).hexdigest()
    # reproducible: a second run writes the same files
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert CliRunner().invoke(app, ["crossfit-split", str(path), "--out", str(out)]).exit_code == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    # a folder that is not a split is never replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    bad = CliRunner().invoke(app, ["crossfit-split", str(path), "--out", str(tmp_path / "mine")])
    assert bad.exit_code == 2 and "is not a crossfit split" in bad.output
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_cache_teacher_checks_the_split_the_fold_teachers_were_fine_tuned_on(lm, tmp_path):
    from kdforge.crossfit import write_crossfit_split
    from kdforge.recipe import parse_recipe
    from kdforge.tasks.causal_lm import crossfit_split
    from kdforge.teachers.cache import CacheOptions, cache_recipe_teacher

    split = tmp_path / "split"
    crossfit_split(parse_recipe(with_teacher(lm["recipe"], crossfit={"folds": K, "seed": SEED})), split)
    options = CacheOptions(k=TOP_K, temperature=T, batch_size=8)

    def cache(crossfit: dict, out: str):
        recipe = with_teacher(lm["recipe"], crossfit={"models": lm["models"][:K], **crossfit})
        return cache_recipe_teacher(parse_recipe(recipe), out=tmp_path / out, options=options)

    one_line(rf"teacher.crossfit.split '{split}' was written for other folds than the recipe's now \(seed {SEED} "
             rf"there, {SEED + 1} now\), so a fold teacher may have seen its own fold",
             lambda: cache({"folds": K, "seed": SEED + 1, "split": str(split)}, "c1"))
    blocks = train_blocks(lm["recipe"], lm["tokenizer"])  # a split of other data (one block fewer)
    other = tmp_path / "other"
    write_crossfit_split(blocks[:-1], block_folds(len(blocks) - 1, K, seed=SEED), lm["tokenizer"], other,
                         info={"seed": SEED, "n_blocks": len(blocks) - 1})
    one_line(r"was written for other folds .*n_blocks 63 there, 64 now", lambda: cache(
        {"folds": K, "seed": SEED, "split": str(other)}, "c2"))
    one_line(r"teacher.crossfit.split '.*' holds no kdforge-crossfit-split manifest.json",
             lambda: cache({"folds": K, "seed": SEED, "split": str(tmp_path)}, "c3"))
    assert not any((tmp_path / c).exists() for c in ("c1", "c2", "c3"))  # refused before any teacher loads
    index = cache({"folds": K, "seed": SEED, "split": str(split)}, "c4")[1]  # the split of these folds passes
    assert index["complete"] and index["meta"]["crossfit"]["seed"] == SEED


def test_crossfit_split_refusals_name_the_fix(lm, tmp_path):
    from kdforge.recipe import parse_recipe
    from kdforge.tasks.causal_lm import crossfit_split

    one_line(r"crossfit-split needs teacher.crossfit; set teacher: \{kind: cache, path: DIR, crossfit: \{folds: K\}\}",
             lambda: crossfit_split(parse_recipe(with_teacher(lm["recipe"], crossfit=None)), tmp_path / "s"))
    seq = parse_recipe({"task": "sequence_classification", "teacher": {"model": "all-minilm-l6-v2",
                                                                        "crossfit": {"folds": 3}}})
    one_line("task sequence_classification has none to write .*train their fold teachers themselves",
             lambda: crossfit_split(seq, tmp_path / "s"))
    assert not (tmp_path / "s").exists()


def _direct_top_k(model_dir: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A teacher's top-k at T in float64, from its own logits: (ids sorted [n, T, k], log-probs [n, T, V])."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).double().eval()
    with torch.no_grad():
        log_p = torch.log_softmax(model(input_ids=ids).logits / T, dim=-1)
    return log_p.topk(TOP_K, dim=-1).indices.sort(dim=-1).values, log_p


def test_each_block_is_cached_from_its_fold_teacher(lm, crossfit_cache):
    from kdforge.data.packing import TokenBlocks, make_batch
    from kdforge.teachers.cache import CachedTeacher

    path, index = crossfit_cache
    blocks = train_blocks(lm["recipe"], lm["tokenizer"])
    folds = block_folds(len(blocks), K, seed=SEED)
    assert index["complete"] and index["meta"]["crossfit"] == {
        "folds": K, "seed": SEED, "models": lm["models"][:K], "fold_sizes": torch.bincount(folds).tolist()}
    cached = CachedTeacher(path, blocks_ids=blocks, tokenizer=lm["tokenizer"])
    pick = torch.cat([(folds == k).nonzero().squeeze(-1)[:3] for k in range(K)])  # three blocks of every fold
    sparse = cached(make_batch(TokenBlocks(blocks, torch.zeros(len(blocks))), pick)).logits
    got_ids, order = sparse.ids.sort(dim=-1)
    got_lp = sparse.logits.gather(-1, order) / T - sparse.logsumexp.unsqueeze(-1)
    direct = [_direct_top_k(m, blocks[pick]) for m in lm["models"][:K]]
    for row, block in enumerate(pick.tolist()):
        mine = int(folds[block])
        ids, log_p = direct[mine][0][row], direct[mine][1][row]
        assert torch.equal(got_ids[row], ids)
        torch.testing.assert_close(got_lp[row].double(), log_p.gather(-1, ids), rtol=0, atol=5e-3)
        other_ids, other_lp = direct[(mine + 1) % K][0][row], direct[(mine + 1) % K][1][row]
        assert not torch.equal(got_ids[row], other_ids)  # not another fold's teacher
        assert (got_lp[row].double() - other_lp.gather(-1, got_ids[row])).abs().max() > 0.1


def test_a_sampled_crossfit_cache_draws_from_the_fold_teacher(lm, tmp_path):
    """mode sampled: block i's draws are the inverse-transform draws of its fold teacher's distribution at T, from
    the uniforms of its place in its fold (the documented per-block generator)."""
    from typer.testing import CliRunner

    from kdforge.cli import app
    from kdforge.data.packing import TokenBlocks, make_batch
    from kdforge.teachers.cache import CacheOptions, CachedTeacher, _uniforms

    recipe = {**lm["recipe"], "data": {**lm["recipe"]["data"], "max_train_tokens": 512}}  # 16 blocks
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    path = tmp_path / "sampled"
    result = CliRunner().invoke(app, ["cache-teacher", str(tmp_path / "r.yaml"), "--mode", "sampled", "--samples",
                                      "6", "--ids", "plain", "--seed", "3", "--out", str(path)])
    assert result.exit_code == 0 and "cross-fitted: block i from the teacher of its fold" in result.output, \
        result.output
    options = CacheOptions(mode="sampled", samples=6, seed=3)  # what the draws' uniforms depend on
    blocks = train_blocks(recipe, lm["tokenizer"])
    folds = block_folds(len(blocks), K, seed=SEED)
    cached = CachedTeacher(path)
    drawn = cached(make_batch(TokenBlocks(blocks, torch.zeros(len(blocks))), torch.arange(len(blocks)))).logits.ids
    for block in range(len(blocks)):
        fold = int(folds[block])
        _, log_p = _direct_top_k(lm["models"][fold], blocks[block:block + 1])
        cdf = log_p[0].exp().cumsum(-1)
        u = _uniforms(options, [block], blocks.shape[1]) * cdf[:, -1:]  # seeded by its row in all the blocks
        assert torch.equal(drawn[block], torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[-1] - 1))


def test_a_rerun_of_a_complete_crossfit_cache_loads_no_teacher(lm, crossfit_cache, monkeypatch):
    from kdforge import models
    from kdforge.recipe import parse_recipe
    from kdforge.teachers.cache import CacheOptions, cache_recipe_teacher

    path, index = crossfit_cache
    monkeypatch.setattr(models, "load_teacher", lambda *a, **k: pytest.fail("a complete fold was recomputed"))
    again = cache_recipe_teacher(parse_recipe(lm["recipe"]), options=CacheOptions(
        k=TOP_K, values="fp16", ids="plain", lse_dtype="float32", temperature=T, shard_blocks=8, batch_size=8))[1]
    assert again == index


def test_a_killed_crossfit_build_resumes_with_the_folds_left(lm, crossfit_cache, tmp_path, monkeypatch):
    import shutil

    from kdforge import models
    from kdforge.recipe import parse_recipe
    from kdforge.teachers.cache import CacheOptions, CachedTeacher, cache_recipe_teacher

    path = tmp_path / "cache"
    shutil.copytree(crossfit_cache[0], path)
    index = json.loads((path / "index.json").read_text())
    (path / "index.json").write_text(json.dumps({**index, "complete": False}))
    shutil.rmtree(path / "fold_1")  # killed before fold 1 was cached
    one_line(r"is incomplete \(not every fold cached\); rerun `kdforge cache-teacher`", lambda: CachedTeacher(path))
    loaded = []
    real = models.load_teacher
    monkeypatch.setattr(models, "load_teacher", lambda spec, *a: loaded.append(spec.model) or real(spec, *a))
    cache_recipe_teacher(parse_recipe(lm["recipe"]), out=path, options=CacheOptions(
        k=TOP_K, values="fp16", ids="plain", lse_dtype="float32", temperature=T, shard_blocks=8, batch_size=8))
    assert loaded == [lm["models"][1]]
    from safetensors.torch import load_file

    shards = sorted((crossfit_cache[0] / "fold_1").glob("shard_*"))
    assert shards and [f.name for f in shards] == sorted(f.name for f in (path / "fold_1").glob("shard_*"))
    for f in shards:  # the same entries (up to float32 rounding of the teacher's forward)
        old, new = load_file(f), load_file(path / "fold_1" / f.name)
        assert old.keys() == new.keys() and torch.equal(old["ids"], new["ids"])
        for key in old:
            torch.testing.assert_close(new[key].float(), old[key].float(), rtol=1e-3, atol=1e-3)


def test_distilling_from_the_crossfit_cache_end_to_end(lm, crossfit_cache, tmp_path):
    from kdforge.recipe import parse_recipe
    from kdforge.train import prepare, train

    recipe = parse_recipe({**lm["recipe"], "output_dir": str(tmp_path / "run")})
    assert prepare(recipe).teacher is None  # training never loads a teacher's weights: the cache stands in
    out = train(recipe, progress=False)
    final = json.loads((out / "final.json").read_text())
    assert final["teacher"]["perplexity"] > 1  # teacher.model, loaded for the held-out metrics
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss/forward_kl"]) for r in rows)


def test_bad_crossfit_recipes_are_one_line_refusals(lm, tiny_assets):
    from kdforge.recipe import parse_recipe

    recipe, models = lm["recipe"], lm["models"]
    one_line(r"teacher.crossfit.models lists 2 teacher\(s\) but teacher.crossfit.folds is 3",
             lambda: parse_recipe(with_teacher(recipe, crossfit={"folds": K, "models": models[:2]})))
    for folds in (1, 0):
        one_line(rf"teacher.crossfit.folds must be an integer from 2 .*got {folds}",
                 lambda: parse_recipe(with_teacher(recipe, crossfit={"folds": folds, "models": models[:1]})))
    one_line(f"teacher.crossfit.models names '{models[0]}' twice", lambda: parse_recipe(
        with_teacher(recipe, crossfit={"folds": 2, "models": [models[0], models[0]]})))
    one_line("set teacher.kind: cache and teacher.path, and build it with `kdforge cache-teacher RECIPE`",
             lambda: parse_recipe(with_teacher(recipe, kind="live", path=None)))
    for key, value in (("models", models[:3]), ("split", "some/split")):
        one_line(f"teacher.crossfit.{key} describes fold teachers the user fine-tuned, which only task causal_lm "
                 "takes", lambda: parse_recipe({"task": "image_classification",
                                                "teacher": {"model": "cnn", "crossfit": {"folds": 3, key: value}}}))
    # sequence_classification cross-fits its own fine-tuned teachers (kdforge.tasks.sequence_classification)
    seq = parse_recipe({"task": "sequence_classification", "teacher": {"model": "all-minilm-l6-v2",
                                                                        "crossfit": {"folds": 3}}})
    assert seq.teacher.crossfit.folds == 3


def test_cache_teacher_refusals(lm, tmp_path):
    from kdforge.recipe import parse_recipe
    from kdforge.teachers.cache import CacheOptions, cache_recipe_teacher

    recipe, models = lm["recipe"], lm["models"]
    options = CacheOptions(k=TOP_K, temperature=T, batch_size=8)

    def cache(r: dict):
        return lambda: cache_recipe_teacher(parse_recipe(r), out=tmp_path / "c", options=options)

    one_line(r"teacher.crossfit.models lists no teachers: fine-tune teacher k on DIR/teacher_k.jsonl .* k = 0..2",
             cache(with_teacher(recipe, crossfit={"folds": K})))
    one_line("teacher.crossfit.folds=65 must be an integer from 2 up to the 64 training blocks",
             cache(with_teacher(recipe, crossfit={"folds": 65, "models": [f"m{i}" for i in range(65)]})))
    wide = [models[0], models[K]]  # the last teacher has 8 more output ids
    one_line(rf"teacher.crossfit.models\[1\] '{models[K]}' has 136 output ids but teacher.model .* has 128",
             cache(with_teacher(recipe, crossfit={"folds": 2, "models": wide})))
    one_line(rf"teacher.crossfit.models\[0\] '{models[K + 1]}' has its own tokenizer, which differs from the "
             r"teacher's \(128 vs 129 entries; .*fine-tune every fold teacher from a model with teacher.model's",
             cache(with_teacher(recipe, crossfit={"folds": 2, "models": [models[K + 1], models[0]]})))
    assert not (tmp_path / "c").exists()  # refused before anything was written


def test_a_cache_of_other_crossfitting_is_refused_with_both_values(lm, crossfit_cache, tmp_path):
    from kdforge.recipe import parse_recipe
    from kdforge.teachers.cache import CacheOptions, cache_recipe_teacher
    from kdforge.train import prepare

    recipe, models = lm["recipe"], lm["models"]
    path = crossfit_cache[0]
    plain = with_teacher(recipe, crossfit=None, path=str(tmp_path / "plain"))
    # no cache yet: distill names the command that builds it
    one_line(r"no teacher cache at .*build it with `kdforge cache-teacher", lambda: prepare(parse_recipe(plain)))
    cache_recipe_teacher(parse_recipe(plain), options=CacheOptions(k=TOP_K, values="fp16", ids="plain",
                                                                   lse_dtype="float32", temperature=T, batch_size=8))
    mine = f"{{folds: 3, seed: 5, models: \\[{', '.join(models[:K])}\\]}}"
    one_line(rf"was built with teacher.crossfit none but the recipe has {mine}; rebuild it with `kdforge "
             "cache-teacher RECIPE`", lambda: prepare(parse_recipe(with_teacher(recipe, path=str(tmp_path / "plain")))))
    one_line(rf"was built with teacher.crossfit {mine} but the recipe has none",
             lambda: prepare(parse_recipe(with_teacher(plain, path=str(path)))))
    reseeded = with_teacher(recipe, crossfit={"folds": K, "seed": SEED + 1, "models": models[:K]})
    one_line(rf"was built with teacher.crossfit {mine} but the recipe has {{folds: 3, seed: 6",
             lambda: prepare(parse_recipe(reseeded)))
    # and cache-teacher does not write a cross-fitted cache over a plain one
    one_line(rf"holds a teacher cache of something else: teacher.crossfit \(cache none, this run {mine}\)",
             lambda: cache_recipe_teacher(parse_recipe(recipe), out=tmp_path / "plain"))
