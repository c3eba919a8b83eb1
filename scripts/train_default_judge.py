"""Build the embedded default judge of rewardserve (service/assets/default-judge).

A tiny generative judge: a LlamaForCausalLM that answers "Yes" or "No" to "Is the answer correct?" on the synthetic,
verifiable arithmetic and unit conversions of scripts/train_default_model.py (whose generators it imports).
  1. tokenizer: the default reward model's, plus two added whole-word tokens "Yes" and "No" (one id each; generator
     text never contains them, which the script checks);
  2. model: the reward model's shape and backbone (embeddings, layers, final norm), new embedding rows set to the mean
     embedding, a fresh lm_head; the whole model is fine-tuned;
  3. data: each preference pair of the generator gives two pointwise items, (prompt, chosen) -> "Yes" and
     (prompt, rejected) -> "No", rendered exactly as the service renders a judge item (see render_ids); the loss is
     cross-entropy over the full vocabulary at the verdict (last) position, plus the reward model's training-only
     auxiliary heads (AuxHeads, never saved);
  4. evaluation in fp32 on the reward model's held-out sets (eval_sets), as pointwise items (judge_eval_sets):
     accuracy = fraction of items where (logit(Yes) - logit(No) > 0) equals the label.

Usage (from the repository root):
    python scripts/train_default_judge.py --out service/assets/default-judge [--steps N] [--seed S] [--threads T]
    python scripts/train_default_judge.py --readme-table service/assets/default-judge/eval.json
The defaults reproduce the shipped judge, which was built by
    python scripts/train_default_judge.py --out /tmp/judge-2k --eval-every 250 --log-every 50
(2000 steps of 64 items: 21 min of training, 22 min of wall time on 1 thread of a 2-core machine shared with another
job; --eval-every and --log-every only print) and copied to service/assets/default-judge.
"""
import argparse
import json
import random
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import AddedToken
from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM

if __package__ in (None, ""):  # run as a file: make `scripts.` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rewardserve.entries import DEFAULT_JUDGE_TEMPLATE, compile_template
from scripts.train_default_model import AuxHeads, adamw_cosine, eval_sets, make_pair
from scripts.train_default_model import readme_table as rm_readme_table

RM_DIR = Path(__file__).resolve().parent.parent / "service" / "assets" / "default-rm"
TEMPLATE = DEFAULT_JUDGE_TEMPLATE  # the server's default: training renders what the service renders
VERDICTS = ("Yes", "No")
PER_CATEGORY = {"test": 400, "heldout_phrasing": 200, "heldout_style": 200, "heldout_phrasing_and_style": 200}
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_parameters", "hidden_act")
_template = compile_template(TEMPLATE)


# ----------------------------------------------------------------------------- rendering, tokenizer
def render_ids(tokenizer, prompt, response):
    """Exactly the service's judge rendering: template text -> one user turn + generation prompt -> ids."""
    text = _template.render(prompt=prompt, response=response, criteria=None, reference=None, messages=None)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(chat, add_special_tokens=False)["input_ids"]  # the template renders BOS itself


def verdict_ids(tokenizer):
    """(id of "Yes", id of "No")."""
    ids = tuple(tokenizer(v, add_special_tokens=False)["input_ids"] for v in VERDICTS)
    assert all(len(i) == 1 for i in ids), f"verdicts must be single tokens: {ids}"
    return ids[0][0], ids[1][0]


def build_tokenizer(rm_dir):
    """The reward model's tokenizer plus whole-word, non-special "Yes" and "No" tokens."""
    tokenizer = AutoTokenizer.from_pretrained(rm_dir)
    for key in ("is_local", "local_files_only", "max_length", "pad_to_multiple_of", "pad_token_type_id"):
        tokenizer.init_kwargs.pop(key, None)  # facts of this load, not settings to ship
    tokenizer.add_tokens([AddedToken(v, single_word=True, normalized=False, special=False) for v in VERDICTS])
    return tokenizer


def check_tokenizer(tokenizer, rm_tokenizer, texts):
    """The added tokens must not change how generator text tokenizes, nor ever occur in it."""
    yes, no = verdict_ids(tokenizer)
    for prompt, response in texts:
        ids = render_ids(tokenizer, prompt, response)
        if ids != render_ids(rm_tokenizer, prompt, response) or yes in ids or no in ids:
            raise ValueError(f"verdict tokens leak into generator text: {prompt!r} / {response!r}")


# ----------------------------------------------------------------------------- data
class Item(tuple):
    """A pointwise judge item. Unpacks as (prompt, response, label, category); .kind ("correct" or the near miss's
    kind) and .pair (its preference pair) ride along for the report and the auxiliary losses."""

    def __new__(cls, prompt, response, label, category, kind, pair):
        item = super().__new__(cls, (prompt, response, label, category))
        item.kind, item.pair = kind, pair
        return item

    prompt, response, label, category = (property(lambda self, i=i: self[i]) for i in range(4))


def pair_items(pair):
    """(prompt, chosen) -> Yes, (prompt, rejected) -> No."""
    return [Item(pair.prompt, pair.chosen, True, pair.category, "correct", pair),
            Item(pair.prompt, pair.rejected, False, pair.category, pair.kind, pair)]


def judge_eval_sets(seed, per_category):
    """The reward model's held-out sets (per_category pairs per category) as pointwise items, two per pair."""
    return {name: [item for pair in pairs for item in pair_items(pair)]
            for name, pairs in eval_sets(seed, per_category).items()}


def collate(id_lists, pad_id):
    """Right-padded input_ids and attention_mask."""
    width = max(map(len, id_lists))
    ids = torch.full((len(id_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(id_lists):
        ids[row, : len(seq)], mask[row, : len(seq)] = torch.tensor(seq), 1
    return {"input_ids": ids, "attention_mask": mask}


# ----------------------------------------------------------------------------- model, training, eval
def build_model(tokenizer, rm_dir):
    """LlamaForCausalLM of the reward model's shape, its backbone copied from the reward model, lm_head fresh."""
    rm_cfg = AutoConfig.from_pretrained(rm_dir)
    cfg = LlamaConfig(**{k: getattr(rm_cfg, k) for k in SHAPE_KEYS}, vocab_size=len(tokenizer),
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
                      architectures=["LlamaForCausalLM"])
    model = LlamaForCausalLM(cfg)
    backbone = {k[len("model."):]: v for k, v in load_file(Path(rm_dir) / "model.safetensors").items()
                if k.startswith("model.")}
    emb = backbone["embed_tokens.weight"]
    extra = len(tokenizer) - emb.shape[0]
    backbone["embed_tokens.weight"] = torch.cat([emb, emb.mean(0, keepdim=True).expand(extra, -1)])
    model.model.load_state_dict(backbone, strict=True)
    return model


def verdict_logits(model, enc, bf16=False):
    """(final hidden states, full-vocabulary logits at each row's last token); weights stay fp32 under autocast."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        h = model.model(**enc).last_hidden_state
        last = h[torch.arange(h.shape[0]), enc["attention_mask"].sum(1) - 1]
        logits = model.lm_head(last)
    return h, logits.float()


@torch.no_grad()
def evaluate(model, tokenizer, items, batch_size=128):
    """fp32 accuracy of (reward > 0) == label overall, per category and per kind; yes-rate; mean P(Yes)+P(No)."""
    model.eval()
    yes, no = verdict_ids(tokenizer)
    groups, said_yes, mass = {}, [], []
    for i in range(0, len(items), batch_size):
        batch = items[i: i + batch_size]
        _, logits = verdict_logits(model, collate([render_ids(tokenizer, q, r) for q, r, *_ in batch],
                                                  tokenizer.pad_token_id))
        probs = logits.softmax(-1)
        for item, ok_yes, m in zip(batch, (logits[:, yes] - logits[:, no] > 0).tolist(),
                                   (probs[:, yes] + probs[:, no]).tolist()):
            for key in ("overall", item.category, "kind:" + item.kind):
                groups.setdefault(key, []).append(ok_yes == item.label)
            said_yes.append(ok_yes)
            mass.append(m)
    model.train()
    return {"n_items": len(items), **{k: round(sum(v) / len(v), 4) for k, v in groups.items()},
            "yes_rate": round(sum(said_yes) / len(said_yes), 4), "verdict_mass": round(sum(mass) / len(mass), 4)}


def train(model, tokenizer, args, monitor=None):
    """Cross-entropy at the verdict position (+ auxiliary heads), AdamW with linear warmup and cosine decay."""
    rng = random.Random(args.seed)
    yes, no = verdict_ids(tokenizer)
    # AuxHeads anchors its answer-digit loss and response LM on its first marker token: here the template's "Answer"
    aux = AuxHeads(model.config.hidden_size, len(tokenizer), tokenizer.convert_tokens_to_ids("Answer"))
    params = list(model.parameters()) + list(aux.parameters())
    opt, sched = adamw_cosine(params, args.lr, args.steps)
    targets = torch.tensor([yes] * (args.batch_size // 2) + [no] * (args.batch_size // 2))
    model.train()
    run_ce = run_aux = 0.0
    run_acc, t0 = 0.5, time.time()
    for step in range(1, args.steps + 1):
        pairs = [make_pair(rng) for _ in range(args.batch_size // 2)]
        # chosen rows then rejected rows: the layout AuxHeads expects
        enc = collate([render_ids(tokenizer, p.prompt, p.chosen) for p in pairs]
                      + [render_ids(tokenizer, p.prompt, p.rejected) for p in pairs], tokenizer.pad_token_id)
        h, logits = verdict_logits(model, enc, bf16=True)
        loss_ce = F.cross_entropy(logits, targets)
        loss_aux = aux(h.float(), enc, pairs) if args.aux > 0 else torch.zeros(())
        (loss_ce + args.aux * loss_aux).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        decay = 0.98 if step > 1 else 0.0
        run_ce = decay * run_ce + (1 - decay) * loss_ce.item()
        run_aux = decay * run_aux + (1 - decay) * loss_aux.item()
        correct = (logits[:, yes] > logits[:, no]) == (targets == yes)
        run_acc = decay * run_acc + (1 - decay) * correct.float().mean().item()
        if step % args.log_every == 0 or step == args.steps:
            print(f"step {step:5d}/{args.steps}  ce-loss {run_ce:.4f}  aux-loss {run_aux:.3f}  acc {run_acc:.3f}  "
                  f"lr {sched.get_last_lr()[0]:.2e}  {time.time() - t0:6.0f}s", flush=True)
        if monitor and args.eval_every and step % args.eval_every == 0:
            print(f"  held-out test: {evaluate(model, tokenizer, monitor)}", flush=True)
    return time.time() - t0


def readme_table(report: dict) -> str:
    """The README's accuracy table, from an eval.json report."""
    return rm_readme_table(report, count="n_items", unit="items")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="service/assets/default-judge")
    ap.add_argument("--rm-dir", default=str(RM_DIR), help="reward model whose tokenizer and backbone start the judge")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64, help="items per step (half Yes, half No), even")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--aux", type=float, default=1.0, help="weight of the training-only auxiliary losses (0 = off)")
    ap.add_argument("--eval-every", type=int, default=0, help="monitor held-out test accuracy every N steps")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--readme-table", metavar="EVAL_JSON", help="only print the README's table of this eval.json")
    args = ap.parse_args()
    if args.readme_table:
        print(readme_table(json.loads(Path(args.readme_table).read_text())))
        return
    if args.batch_size % 2:
        ap.error("--batch-size must be even")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    t_start = time.time()

    tokenizer = build_tokenizer(args.rm_dir)
    sets = judge_eval_sets(args.seed, PER_CATEGORY)
    check_rng = random.Random(args.seed + 2)
    check_tokenizer(tokenizer, AutoTokenizer.from_pretrained(args.rm_dir),
                    [(q, r) for items in sets.values() for q, r, *_ in items]
                    + [(p.prompt, r) for p in (make_pair(check_rng) for _ in range(5000))
                       for r in (p.chosen, p.rejected)])
    model = build_model(tokenizer, args.rm_dir)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(tokenizer)}  verdict ids {verdict_ids(tokenizer)}  params {n_params:,}", flush=True)
    monitor = [item for i, item in enumerate(sets["test"]) if i // 2 % 8 == 0]  # every 8th pair, both its items
    train_seconds = train(model, tokenizer, args, monitor=monitor)
    results = {name: evaluate(model, tokenizer, items) for name, items in sets.items()}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    yes, no = verdict_ids(tokenizer)
    report = {
        "test_accuracy": results["test"],
        "heldout_phrasing_accuracy": results["heldout_phrasing"],
        "heldout_style_accuracy": results["heldout_style"],
        "heldout_phrasing_and_style_accuracy": results["heldout_phrasing_and_style"],
        "template": TEMPLATE, "verdict_token_ids": {"Yes": yes, "No": no},
        "train_items": args.steps * args.batch_size, "train_steps": args.steps, "batch_size": args.batch_size,
        "learning_rate": args.lr, "aux_loss_weight": args.aux, "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - t_start, 1), "threads": args.threads,
        "eval_per_category": PER_CATEGORY, "parameters": n_params, "vocab_size": len(tokenizer), "seed": args.seed,
        "init": "backbone (embeddings, layers, final norm) of the default reward model; Yes/No rows = mean embedding; "
                "fresh lm_head",
        "loss": "cross-entropy over the full vocabulary at the verdict position (Yes for chosen, No for rejected) "
                "+ aux_loss_weight * training-only auxiliary heads of the reward model's recipe",
        "command": shlex.join(["python"] + sys.argv),
    }
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
