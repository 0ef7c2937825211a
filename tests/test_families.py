"""The model families users bring, each through base -> train -> merge with its own chat template.

Per family (tiny random-init model of the real transformers class, tests/families.py): the ids the
train stage trains on are the merged tokenizer's `apply_chat_template`; the labels are exactly the
assistant contents and the end-of-turn token after each; generation config, lmdeploy and
OpenCompass render the same prompt and stop at the family's stop token; a model trained on those
labels stops generating there.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_stage, venv_python, write_params
from families import FAMILIES, write_family_model

CONVERSATIONS = [
    [{"role": "system", "content": "You are a careful pharmacist. Answer in one sentence."},
     {"role": "user", "content": "What is the dose of metformin?"},
     {"role": "assistant", "content": "The usual starting dose is 500 mg with meals."},
     {"role": "user", "content": "How should I store insulin?"},
     {"role": "assistant", "content": "Store insulin in the fridge and never freeze it."}],
    [{"role": "user", "content": "Is amoxicillin an antibiotic?"},
     {"role": "assistant", "content": "Yes, amoxicillin is an antibiotic for bacterial infections."}],
    [{"role": "user", "content": "How much paracetamol a day?"},
     {"role": "assistant", "content": "At most 4 g a day for adults; less with liver disease."}],
]
IGNORE = -100


def write_split(folder: Path) -> None:
    split = folder / "data" / "split"
    split.mkdir(parents=True)
    rows = [{"id": f"r{i}", "messages": m} for i, m in enumerate(CONVERSATIONS * 4)]
    for name in ("train", "val"):
        (split / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Per family: a folder where base, train (hf, 1 epoch) and merge ran on that family's model."""
    folders = {}
    for name, family in FAMILIES.items():
        folder = tmp_path_factory.mktemp(name)
        source = write_family_model(family, folder / "hub_model")
        write_params(folder, {"base": {"source": "hf", "model_id": str(source), "chat_template": family.params_template},
                              "train": {"epochs": 1, "max_length": 256, "batch_size": 4,
                                        "attn_implementation": family.attn_implementation,
                                        "lora": {"target_modules": family.target_modules}}})
        write_split(folder)
        for stage in ("base", "cpt", "train", "dpo", "merge"):
            run_stage(folder, stage)
        folders[name] = folder
    return folders


def merged_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder / "models" / "merged")


def training_examples(folder: Path) -> list[dict]:
    """What the train stage trained on: its own loader over the train split, base tokenizer."""
    from stages.common import load_base_tokenizer
    from stages.train import load_examples

    return load_examples(str(folder / "data/split/train.jsonl"), load_base_tokenizer(folder / "models/base"), 256)


@pytest.mark.parametrize("name", FAMILIES)
def test_training_ids_are_the_merged_tokenizers_chat_template(runs, name):
    tokenizer = merged_tokenizer(runs[name])
    stop = tokenizer.convert_tokens_to_ids(FAMILIES[name].stop)
    for example, messages in zip(training_examples(runs[name]), CONVERSATIONS * 4):
        rendered = list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
        # GLM-4's template ends an answer with nothing: the stop token is appended to learn from
        assert example["input_ids"] == rendered + ([stop] if name == "glm4" else [])


@pytest.mark.parametrize("name", FAMILIES)
def test_labels_are_each_answer_and_its_end_of_turn_token(runs, name):
    tokenizer = merged_tokenizer(runs[name])
    for example, messages in zip(training_examples(runs[name]), CONVERSATIONS * 4):
        runs_of_labels, current = [], []
        for token, label in zip(example["input_ids"], example["labels"]):
            if label != IGNORE:
                assert label == token
                current.append(token)
            elif current:
                runs_of_labels.append(current)
                current = []
        runs_of_labels += [current] if current else []
        answers = [m["content"] + FAMILIES[name].stop for m in messages if m["role"] == "assistant"]
        assert [tokenizer.decode(r).strip() for r in runs_of_labels] == answers


@pytest.mark.parametrize("name", FAMILIES)
def test_merged_model_stops_at_the_familys_end_of_turn_token(runs, name):
    merged = runs[name] / "models" / "merged"
    tokenizer = merged_tokenizer(runs[name])
    eos = json.loads((merged / "generation_config.json").read_text())["eos_token_id"]
    assert eos[0] == tokenizer.convert_tokens_to_ids(FAMILIES[name].stop)
    if FAMILIES[name].params_template:  # a template-less base was given one in params: it travels
        assert tokenizer.chat_template and "Human: " in tokenizer.chat_template


def render_elsewhere(env: str, script: str, jobs: list) -> list:
    """Run `script` in .venvs/<env> over jobs (JSON in, JSON out), as the stage there would."""
    result = subprocess.run([str(venv_python(env)), "-c", script], input=json.dumps(jobs), capture_output=True,
                            text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# lmdeploy's serving path stops at its template's stop words and at the token ids its engine
# collects (AsyncEngine: GenerationConfig.update_from_hf_gen_cfg over get_hf_gen_cfg)
LMDEPLOY_SCRIPT = """
import json, sys
from lmdeploy.messages import GenerationConfig
from lmdeploy.model import get_chat_template
from lmdeploy.utils import get_hf_gen_cfg
from transformers import AutoTokenizer
out = []
for folder, messages in json.loads(sys.stdin.read()):
    template = get_chat_template(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    gen = GenerationConfig()
    gen.update_from_hf_gen_cfg(get_hf_gen_cfg(folder), tokenizer.eos_token_id)
    stops = list(template.stop_words or []) + tokenizer.convert_ids_to_tokens(sorted(gen.stop_token_ids))
    out.append([type(template).__name__, template.messages2prompt(messages), stops])
print(json.dumps(out))
"""
OPENCOMPASS_SCRIPT = """
import json, sys
from stages.eval import opencompass_prompt
print(json.dumps([opencompass_prompt(folder, messages) for folder, messages in json.loads(sys.stdin.read())]))
"""


def test_lmdeploy_and_opencompass_render_the_training_tokens(runs):
    jobs, expected = [], []
    for name, folder in runs.items():
        tokenizer = merged_tokenizer(folder)
        examples = training_examples(folder)
        for messages, example in zip(CONVERSATIONS, examples):
            prompt = messages[:-1]
            text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert example["input_ids"][:len(ids)] == ids, name  # the prompt is a prefix of what was trained
            jobs.append([str(folder / "models" / "merged"), prompt])
            expected.append((name, text))
    from_lmdeploy = render_elsewhere("lmdeploy", LMDEPLOY_SCRIPT, jobs)
    from_opencompass = render_elsewhere("opencompass", OPENCOMPASS_SCRIPT, jobs)
    for (name, text), (kind, lm_text, stops), oc_text in zip(expected, from_lmdeploy, from_opencompass):
        assert kind == "HFChatTemplate" and lm_text == text, name
        assert FAMILIES[name].stop in stops, name
        assert oc_text == text, name


@pytest.mark.parametrize("name", FAMILIES)
def test_a_model_trained_on_these_labels_stops_at_the_stop_token(runs, name):
    """Overfit the family's tiny model on one conversation with the pipeline's labels: greedy
    generation must give the answer and then the end-of-turn token, and stop there. A label mask
    that missed the end-of-turn token (or a wrong stop token) would run on to max_new_tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from stages.chat_template import stop_token_ids, tokenize_conversation
    from stages.common import load_base_tokenizer

    torch.manual_seed(0)
    folder = runs[name]
    tokenizer = load_base_tokenizer(folder / "models/base")
    model = AutoModelForCausalLM.from_pretrained(folder / "hub_model", dtype=torch.float32)
    messages = CONVERSATIONS[1]
    example = tokenize_conversation(tokenizer, messages, 256)
    ids, labels = torch.tensor([example["input_ids"]]), torch.tensor([example["labels"]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(300):  # until the answer is memorised
        loss = model(input_ids=ids, labels=labels).loss
        if loss.item() < 0.05:
            break
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    prompt = tokenizer(tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False),
                       add_special_tokens=False, return_tensors="pt")["input_ids"]
    stops = stop_token_ids(tokenizer)
    out = model.generate(prompt, max_new_tokens=40, do_sample=False, eos_token_id=stops,
                         pad_token_id=tokenizer.pad_token_id or stops[0])[0, prompt.shape[1]:].tolist()
    answer = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE]
    assert out == answer and out[-1] == tokenizer.convert_tokens_to_ids(FAMILIES[name].stop)
