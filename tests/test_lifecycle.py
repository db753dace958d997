"""The transplant lifecycle: the pure plan (no model), one apply step for both directions, the context manager,
joint recovery, bridge-mode recipients that refuse to save, and the package's shape (imports, errors, API)."""

import ast
import inspect
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_input_ids, tiny_model
from tiny_tokenizer import code_documents, tiny_tokenizer

import not_hub
from not_hub import errors
from not_hub.data import make_blocks, split_documents
from not_hub.errors import InvalidModeError, InvalidPositionError, TransplantStateError
from not_hub.plan import MODES, plan_transplant, valid_positions

PACKAGE = Path(not_hub.__file__).parent

# ------------------------------------------------------------------------------------------- the plan alone


@pytest.mark.parametrize(
    "mode, remove, expected_removed, last",
    [("replace", None, 3, 27), ("insert", None, 0, 30), ("bridge", None, 0, 30), ("splice", 5, 5, 25)],
)
def test_plan_of_every_mode(mode, remove, expected_removed, last):
    plan = plan_transplant(mode, 4, organ_layers=3, depth=30, remove=remove)
    assert (plan.position, plan.remove, plan.insert) == (4, expected_removed, 3)
    assert plan.depth_after == 30 - expected_removed + 3
    assert plan.inserted_range == (4, 7) and plan.removed_range == (4, 4 + expected_removed)
    assert valid_positions(mode, 3, 30, remove=remove) == range(0, last + 1)
    plan_transplant(mode, last, organ_layers=3, depth=30, remove=remove)  # the last valid position fits
    with pytest.raises(InvalidPositionError, match=f"expected 0 <= position <= {last}"):
        plan_transplant(mode, last + 1, organ_layers=3, depth=30, remove=remove)
    with pytest.raises(InvalidPositionError, match="expected 0 <= position"):
        plan_transplant(mode, -1, organ_layers=3, depth=30, remove=remove)
    # The inverse undoes it: applied to lists, a plan and its inverse give back the original.
    stack = list(range(30))
    spliced, removed = plan.splice(stack, ["o1", "o2", "o3"])
    assert len(spliced) == plan.depth_after and spliced[4:7] == ["o1", "o2", "o3"]
    restored, taken = plan.inverse().splice(spliced, removed)
    assert restored == stack and taken == ["o1", "o2", "o3"]


def test_plan_of_an_excision():
    plan = plan_transplant("excise", 20, organ_layers=0, depth=30, remove=4)
    assert (plan.remove, plan.insert, plan.depth_after) == (4, 0, 26)
    assert plan.inverse().splice(*plan.splice(list(range(30)), []))[0] == list(range(30))
    with pytest.raises(InvalidPositionError, match="expected 0 <= position <= 26"):
        plan_transplant("excise", 27, organ_layers=0, depth=30, remove=4)
    with pytest.raises(InvalidPositionError, match="overlaps"):
        plan_transplant("excise", 3, organ_layers=0, depth=30, remove=4, occupied=[(5, 8)])


@pytest.mark.parametrize("position", [True, 2.0, "2", None])
def test_plan_refuses_positions_that_are_not_integers(position):
    with pytest.raises(InvalidPositionError, match="position="):
        plan_transplant("replace", position, organ_layers=2, depth=6)


def test_plan_refuses_unknown_modes_and_misused_remove():
    with pytest.raises(InvalidModeError, match="mode='graft'"):
        plan_transplant("graft", 0, organ_layers=2, depth=6)
    with pytest.raises(InvalidPositionError, match="remove="):
        plan_transplant("splice", 0, organ_layers=2, depth=6)
    with pytest.raises(InvalidPositionError, match="mode='splice'"):
        plan_transplant("insert", 0, organ_layers=2, depth=6, remove=1)
    assert set(MODES) == {"replace", "insert", "bridge", "splice", "excise"}


@pytest.mark.parametrize(
    "mode, position, clash",
    [
        ("replace", 3, True),  # takes out layer 4 of the organ at [4, 6)
        ("replace", 6, False),
        ("replace", 1, False),  # [1, 4) ends where the organ starts
        ("insert", 5, True),  # strictly inside the organ: would split it
        ("insert", 4, False),  # right before it
        ("insert", 6, False),  # right after it
        ("splice", 5, True),
    ],
)
def test_plan_refuses_overlaps_with_organs_already_in(mode, position, clash):
    kwargs = dict(organ_layers=3, depth=10, occupied=[(4, 6)], remove=1 if mode == "splice" else None)
    if clash:
        with pytest.raises(InvalidPositionError, match=r"overlaps the organ already transplanted at layers \[4, 6\)"):
            plan_transplant(mode, position, **kwargs)
    else:
        assert plan_transplant(mode, position, **kwargs).position == position


def test_plan_needs_no_model():
    source = (PACKAGE / "plan.py").read_text()
    imported = {n.names[0].name.split(".")[0] for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Import)}
    imported |= {
        n.module.split(".")[0] for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom) and n.level == 0
    }
    assert not imported & {"torch", "transformers"}


# ------------------------------------------------------------------------------------------ apply, both ways


@pytest.mark.parametrize("remove", [0, 1, 3])
def test_splice_transplant_and_explant_are_exact(remove, hash_state):
    recipient = tiny_model("llama")
    organ = not_hub.extract_organ(tiny_model("llama", seed=3), layer_range=(1, 3))
    before = hash_state(recipient)
    ids = tiny_input_ids()
    with organ.transplanted(recipient, position=2, mode="splice", remove=remove) as transplant:
        assert recipient.config.num_hidden_layers == 6 - remove + 2 == len(recipient.model.layers)
        assert transplant.layer_indices == [2, 3] and transplant.entry["removed_layers"] == remove
        with torch.no_grad():
            cached = recipient.generate(ids[:1], max_new_tokens=5, do_sample=False, use_cache=True)
            uncached = recipient.generate(ids[:1], max_new_tokens=5, do_sample=False, use_cache=False)
        assert torch.equal(cached, uncached)
    assert hash_state(recipient) == before


def test_explant_goes_through_the_same_apply_step(monkeypatch):
    recipient = tiny_model("llama")
    organ = not_hub.extract_organ(recipient, layer_range=(2, 4))
    seen = []
    real = not_hub.transplant.apply_plan

    def spy(recipient_, spec, plan, incoming, per_layer, transplants):
        seen.append((plan.mode, plan.position, plan.remove, plan.insert))
        return real(recipient_, spec, plan, incoming, per_layer, transplants)

    monkeypatch.setattr(not_hub.transplant, "apply_plan", spy)
    with organ.transplanted(recipient, position=1, mode="insert"):
        pass
    assert seen == [("insert", 1, 0, 2), ("undo insert", 1, 2, 0)]


def test_context_manager_explants_on_error(hash_state):
    recipient = tiny_model("llama")
    organ = not_hub.extract_organ(recipient, layer_range=(2, 4))
    before = hash_state(recipient)
    with pytest.raises(ZeroDivisionError):
        with organ.transplanted(recipient, position=0, mode="insert"):
            raise ZeroDivisionError("inside the block")
    assert hash_state(recipient) == before and not not_hub.transplants_of(recipient)


def test_joint_recovery_trains_every_organ_and_explants_in_any_order(hash_state):
    blocks = make_blocks(split_documents(code_documents(), seed=0), tiny_tokenizer(), 32)
    for order in ((0, 1), (1, 0)):
        recipient = tiny_model("llama")
        before = hash_state(recipient)
        a = not_hub.extract_organ(tiny_model("llama", seed=2), layer_range=(0, 1))
        b = not_hub.extract_organ(tiny_model("llama", seed=3), layer_range=(4, 5))
        ta, tb = a.transplant_into(recipient, position=1), b.transplant_into(recipient, position=4)
        start = {id(p): p.detach().clone() for t in (ta, tb) for layer in t.layers for p in layer.parameters()}
        metrics = not_hub.recover(recipient, [ta, tb], blocks, radius=1, max_steps=2, lr=1e-2, progress=False)
        assert metrics.steps == 2
        for t in (ta, tb):
            assert any(not torch.equal(start[id(p)], p) for layer in t.layers for p in layer.parameters())
            assert t.entry["recovery"]["joint"] == 2
        for i in order:
            (ta, tb)[i].explant()
        assert hash_state(recipient) == before


# ------------------------------------------------------------------------------------ bridge recipients


def test_a_bridge_mode_recipient_cannot_be_saved_or_pushed_silently_wrong(tmp_path, hash_state):
    recipient = tiny_model("llama")
    organ = not_hub.extract_organ(recipient, layer_range=(2, 4))
    with organ.transplanted(recipient, position=2, mode="bridge") as transplant:
        with pytest.raises(TransplantStateError, match="bridge-mode"):
            recipient.save_pretrained(tmp_path / "model")
        with pytest.raises(TransplantStateError, match="bridge-mode"):
            not_hub.push_recipient(recipient, "me/model")
        assert not (tmp_path / "model").exists()
        transplant.to_organ().save_pretrained(tmp_path / "organ")  # the supported way: organ + bridges
    recipient.save_pretrained(tmp_path / "model")  # explanted: a plain model again
    assert (tmp_path / "model" / "config.json").is_file()
    # replace and insert recipients still save
    with organ.transplanted(recipient, position=2, mode="insert"):
        recipient.save_pretrained(tmp_path / "inserted")


def test_cli_recover_refuses_saving_a_bridge_recipient_before_training(tmp_path, capsys):
    from not_hub.cli import main

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    not_hub.extract_organ(model, layer_range=(2, 4)).save_pretrained(tmp_path / "organ")
    (tmp_path / "train.txt").write_text("\n".join(code_documents(100)))
    code = main(
        [
            "recover", str(tmp_path / "organ"), "--recipient", str(tmp_path / "model"), "--position", "2",
            "--mode", "bridge", "--save-to", str(tmp_path / "out"), "--data", str(tmp_path / "train.txt"),
        ]
    )  # fmt: skip
    assert code == 1 and "bridge" in capsys.readouterr().err and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------- the package's shape


def _imports(path: Path) -> tuple[set[str], list[str]]:
    """(package modules imported at module level, package imports made inside functions)."""
    tree = ast.parse(path.read_text())
    module = path.relative_to(PACKAGE.parent).with_suffix("").as_posix().replace("/", ".")
    if module.endswith(".__init__"):
        module = module[: -len(".__init__")]
        package = module
    else:
        package = module.rpartition(".")[0]
    top, nested = set(), []

    def resolve(node: ast.ImportFrom) -> list[str]:
        base = package
        for _ in range(node.level - 1):
            base = base.rpartition(".")[0]
        name = f"{base}.{node.module}" if node.module else base
        return [name] if node.module else [f"{base}.{a.name}" for a in node.names]

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom) and child.level > 0:
                names = resolve(child)
                (nested.extend if inner else top.update)(names)
            elif isinstance(child, ast.ImportFrom) and (child.module or "").startswith("not_hub"):
                (nested.append if inner else top.add)(child.module)
            elif isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
                continue  # typing-only imports run nothing
            else:
                visit(child, inner)

    visit(tree, False)
    return {m for m in top if m.startswith("not_hub")}, nested


def test_no_import_cycle_and_no_function_level_package_imports():
    graph, nested = {}, {}
    for path in PACKAGE.rglob("*.py"):
        name = path.relative_to(PACKAGE.parent).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
        graph[name], found = _imports(path)
        if found:
            nested[name] = found
    assert not nested, f"function-level imports inside not_hub: {nested}"
    modules = set(graph)
    graph = {m: {d if d in modules else d.rpartition(".")[0] for d in deps} & modules for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for d in graph[m]:
            if d == m or d == "not_hub":
                continue
            if state.get(d) == 1:
                raise AssertionError(f"import cycle: {' -> '.join([*path, m, d])}")
            if d not in state:
                visit(d, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert graph["not_hub.errors"] == set()  # the error catalogue imports nothing of the package
    assert "not_hub.modeling_organ" not in graph["not_hub.transplant"]  # one direction: organ -> transplant


def test_every_error_in_the_catalogue_is_also_a_builtin():
    catalogue = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__]
    error_classes = [c for c in catalogue if issubclass(c, errors.NotHubError)]
    assert len(error_classes) >= 16
    for cls in error_classes:
        if cls is errors.NotHubError:
            continue
        builtins = [
            b for b in cls.__mro__ if b.__module__ == "builtins" and b not in (Exception, BaseException, object)
        ]
        assert builtins, f"{cls.__name__} is not also a builtin error"
        assert cls.__doc__, f"{cls.__name__} has no docstring"
    for cls in catalogue:
        assert issubclass(cls, (errors.NotHubError, errors.NotHubWarning)), cls


def test_public_api_is_curated():
    assert {
        "train_organ",
        "recover",
        "OrganTrainingArguments",
        "perplexity",
        "position_sweep",
        "TrainingMetrics",
    } <= set(not_hub.__all__)
    import transformers

    # no public name shadows one that every user knows from transformers (a `TrainingArguments` of our own did)
    assert not set(not_hub.__all__) & set(dir(transformers))
    assert not {"standalone_shell", "capture_layer_inputs", "transplant_into", "check_compatibility"} & set(
        not_hub.__all__
    )
    for name in not_hub.__all__:
        assert hasattr(not_hub, name), name


LAZY_IMPORT = """
import sys
import not_hub
heavy = [m for m in ("datasets", "peft", "transformers.trainer", "not_hub.training") if m in sys.modules]
assert not heavy, heavy  # loading and grafting an organ pays for none of them
assert set(not_hub.__all__) <= set(dir(not_hub))
assert not_hub.evaluation.add_evaluation_result  # a submodule is an attribute, as when the package imported it
from not_hub import train_organ, perplexity
assert train_organ is sys.modules["not_hub.training"].train_organ
assert perplexity is sys.modules["not_hub.evaluation"].perplexity
try:
    not_hub.no_such_name
except AttributeError as err:
    assert "no_such_name" in str(err)
else:
    raise AssertionError("no AttributeError")
print("LAZY-OK")
"""


def test_import_not_hub_leaves_training_to_first_use():
    """Fresh process: `import not_hub` does not import datasets, peft or transformers' Trainer; every
    public name and submodule still resolves, to the same object as its module's."""
    import sys

    import warm_python

    out = warm_python.run([sys.executable, "-c", LAZY_IMPORT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "LAZY-OK" in out.stdout, out.stderr[-2000:]


# ------------------------------------------------------------------------------- organs that carry their recovery


@pytest.mark.parametrize(
    "mode, position, radius, roles",
    [
        ("replace", 2, 1, ["neighbour", "organ", "organ", "neighbour"]),
        ("insert", 2, 1, ["neighbour", "organ", "organ", "neighbour"]),
        ("replace", 0, 1, ["organ", "organ", "neighbour"]),  # no layer below: one neighbour only
        ("insert", 3, 2, ["neighbour", "neighbour", "organ", "organ", "neighbour", "neighbour"]),
    ],
)
def test_a_recovered_organ_exported_whole_reproduces_the_recovered_recipient(
    mode, position, radius, roles, tmp_path, hash_state
):
    blocks = make_blocks(split_documents(code_documents(), seed=0), tiny_tokenizer(), 32)
    recipient = tiny_model("llama")
    before = hash_state(recipient)
    organ = not_hub.extract_organ(tiny_model("llama", seed=3), layer_range=(1, 3))
    transplant = organ.transplant_into(recipient, position=position, mode=mode)
    not_hub.recover(recipient, transplant, blocks, radius=radius, max_steps=2, lr=1e-2, progress=False)
    ids = tiny_input_ids()
    with torch.no_grad():
        recovered = recipient(ids).logits
    exported = transplant.to_organ()
    assert exported.config.layer_roles == roles
    exported.save_pretrained(tmp_path / "organ")
    transplant.explant()
    assert hash_state(recipient) == before  # explant still restores the recipient bit for bit

    loaded = not_hub.OrganModel.from_pretrained(tmp_path / "organ")
    card = (tmp_path / "organ" / "README.md").read_text()
    assert "carries its recovery" in card and "recovered neighbour" in card
    fresh = tiny_model("llama")
    with loaded.transplanted(fresh) as grafted:  # position and mode taken from the organ
        assert grafted.mode == "splice"
        with torch.no_grad():
            assert torch.equal(fresh(ids).logits, recovered)
            cached = fresh.generate(ids[:1], max_new_tokens=4, do_sample=False, use_cache=True)
            assert torch.equal(cached, fresh.generate(ids[:1], max_new_tokens=4, do_sample=False, use_cache=False))
    assert hash_state(fresh) == before


def test_a_splice_refuses_bad_input_and_leaves_the_recipient_unchanged(hash_state):
    recipient = tiny_model("llama")
    organ = not_hub.extract_organ(tiny_model("llama", seed=3), layer_range=(1, 3))
    before = hash_state(recipient)
    for kwargs, match in (
        (dict(position=5, remove=2), "expected 0 <= position <= 4"),
        (dict(position=0, remove=7), "expected 0 <= position <= -1"),
        (dict(position=1, remove=-1), "remove="),
        (dict(position=1), "remove="),
    ):
        with pytest.raises(InvalidPositionError, match=match):
            organ.transplant_into(recipient, mode="splice", **kwargs)
    with organ.transplanted(recipient, position=4, mode="insert"):
        with pytest.raises(InvalidPositionError, match="overlaps"):
            organ.transplant_into(recipient, position=3, mode="splice", remove=2)
    assert hash_state(recipient) == before
