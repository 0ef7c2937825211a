"""The OpenCompass config the eval stage writes (stages/eval.py step 3): one file a user can rerun
as-is (`.venvs/opencompass/bin/opencompass eval/opencompass_config.py`), naming each model (an
OpenCompass HuggingFace entry, or an OpenAI (API) entry for a served one: stages/eval_served.py) and
each set's dataset entry (stages/eval_sets.py)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from stages import eval_sets, eval_served
from stages.common import pick_dtype

if TYPE_CHECKING:
    from stages.eval import EvalParams

# OpenCompass roles -> chat roles for HuggingFacewithChatTemplate. OpenCompass's default meta
# template sends SYSTEM as HUMAN (merged into the user turn); ChatML has a system turn, so keep it.
CHAT_META_TEMPLATE = dict(
    round=[dict(role="HUMAN", api_role="HUMAN"), dict(role="BOT", api_role="BOT", generate=True)],
    reserved_roles=[dict(role="SYSTEM", api_role="SYSTEM")],
)
RUN_NAME = "tunepipe_eval"                 # OpenCompass work dir: outputs/<RUN_NAME>/<OC_RUN_DIR>/
OC_RUN_DIR = "run"                         # the stage's run folder (OpenCompass's default: the start time)
PPL_RUN_NAME = "tunepipe_eval_ppl"         # eval.mcq.mode ppl
CHAT_MODEL, PPL_MODEL = "opencompass.models.HuggingFacewithChatTemplate", "opencompass.models.HuggingFaceBaseModel"

CONFIG_HEAD = '''\
# OpenCompass config written by tunepipe's eval stage (stages/eval.py); do not edit, rerun the stage.
# Rerun it by hand from anywhere (results go to ./outputs/{run_name}/<timestamp>/):
#     .venvs/opencompass/bin/opencompass {config_path}
# Paths are relative to this file: mmengine fills in {{{{ fileDirname }}}} when it loads it.
# Types are named by import path and the file has no import statement, which keeps mmengine's
# plain config mode: in its lazy-import mode neither {{{{ fileDirname }}}} nor the shim below would
# take effect.

# Compatibility (transformers >= 5): PreTrainedTokenizerBase.batch_encode_plus was removed, and
# opencompass 0.5.4's HuggingFacewithChatTemplate.generate still calls it. Calling the tokenizer on
# a list is the same operation. Loading this config applies it, and the runners below run their
# tasks in this process (debug=True), so it reaches them. Drop it once opencompass stops calling it.
_tokenizer_base = __import__('transformers').PreTrainedTokenizerBase  # (an import statement would
if not hasattr(_tokenizer_base, 'batch_encode_plus'):                 # switch mmengine to lazy mode)
    _tokenizer_base.batch_encode_plus = _tokenizer_base.__call__
del _tokenizer_base

work_dir = 'outputs/{run_name}'

# Chat models keep the system turn as a system message (OpenCompass's default maps it to the user
# turn), so the prompt is the model's chat template over the conversation exactly as trained.
_chat_meta_template = {meta_template!r}
'''

CONFIG_BODY = '''
# tunepipe's own evaluators (stages/oc_plugins.py) are imported from the repository: run from its
# root with PYTHONPATH=. when the config names them.
datasets = [{datasets}
]

models = [{models}
]

# Tasks run one after another in this process (one model at a time, on the device its entry names:
# run_cfg num_gpus and model_kwargs device_map), deterministically, and the shim above applies.
infer = dict(
    partitioner=dict(type='opencompass.partitioners.NaivePartitioner'),
    runner=dict(type='opencompass.runners.LocalRunner', max_num_workers=1, debug=True,
                task=dict(type='opencompass.tasks.OpenICLInferTask')),
)
eval = dict(
    partitioner=dict(type='opencompass.partitioners.NaivePartitioner'),
    runner=dict(type='opencompass.runners.LocalRunner', max_num_workers=1, debug=True,
                task=dict(type='opencompass.tasks.OpenICLEvalTask')),
)
'''

MODEL_ENTRY = '''
    dict(
        type={model_type!r},
        abbr={abbr!r},
        path={path},
        tokenizer_path={tokenizer_path},
        model_kwargs={model_kwargs},
        tokenizer_kwargs={tokenizer_kwargs},
        generation_kwargs=dict(do_sample=False, num_beams=1),  # greedy
        meta_template=_chat_meta_template,
        stop_words={stop!r},
        pad_token_id={pad_token_id!r},
        max_seq_len={max_seq_len},
        max_out_len={max_new_tokens},
        batch_size={batch_size},
        run_cfg={run_cfg},
    ),'''


def config_path_expr(path: str, config_dir: Path) -> str:
    """A local folder next to the output folder (in the repo) relative to the config file, so the
    written config travels with the repo; a hub id or a folder elsewhere (the HF cache) as is."""
    local = Path(path).resolve()
    if Path(path).exists() and config_dir.resolve().parent in local.parents:
        return repr("{{ fileDirname }}/" + Path(os.path.relpath(local, config_dir.resolve())).as_posix())
    return repr(str(local) if Path(path).exists() else path)


def hf_run_settings(device: str, dtype: str) -> dict:
    """What an OpenCompass HuggingFace model entry needs to run on `device` (as pick_device returns
    it) in eval.dtype `dtype`: a GPU for the task and the model on it, or the CPU."""
    gpu = device.startswith("cuda")
    return {"model_kwargs": {"device_map": device, "torch_dtype": pick_dtype(dtype, device)},
            "run_cfg": {"num_gpus": 1 if gpu else 0}}


def write_config(path: Path, final_dir: Path, p: EvalParams, models: list[dict], device: str,
                 stop_words: list[str], pad_token_id: int | None = None, datasets: str | None = None,
                 model_type: str = CHAT_MODEL, run_name: str = RUN_NAME) -> None:
    """`path` is where the config is written now (a temporary sibling of `final_dir`); the models
    run on `device` (see hf_run_settings); a model's own "dtype" overrides eval.dtype. datasets: the
    entries' text (eval_sets); default the generative set eval.dataset alone."""
    entries = []
    for m in models:
        if "api" in m:
            entries.append(eval_served.api_entry(m, config_path_expr(m["tokenizer_path"], path.parent), p.max_seq_len,
                                                 p.max_new_tokens, p.batch_size))
            continue
        settings = hf_run_settings(device, m.get("dtype") or p.dtype)
        model_kwargs = dict(settings["model_kwargs"])
        tokenizer_kwargs = {}
        if m.get("revision"):
            model_kwargs["revision"] = tokenizer_kwargs["revision"] = m["revision"]
        if m.get("trust_remote_code"):
            model_kwargs["trust_remote_code"] = tokenizer_kwargs["trust_remote_code"] = True
        entries.append(MODEL_ENTRY.format(
            model_type=model_type, abbr=m["abbr"], path=config_path_expr(m["path"], path.parent), model_kwargs=model_kwargs,
            tokenizer_path=config_path_expr(m.get("tokenizer_path", m["path"]), path.parent),
            tokenizer_kwargs=tokenizer_kwargs, stop=stop_words, pad_token_id=pad_token_id, max_seq_len=p.max_seq_len,
            max_new_tokens=p.max_new_tokens, batch_size=p.batch_size, run_cfg=settings["run_cfg"]))
    text = CONFIG_HEAD.format(run_name=run_name, config_path=(final_dir / path.name).as_posix(),
                              meta_template=CHAT_META_TEMPLATE)
    if datasets is None:
        datasets = eval_sets.chat_entry(p.dataset, p.max_new_tokens)
    text += CONFIG_BODY.format(datasets=datasets, models="".join(entries))
    path.write_text(text, encoding="utf-8")
