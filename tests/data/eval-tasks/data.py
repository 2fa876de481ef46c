"""Loads the documents of the d2mc_facts task from the JSONL file beside this module (its directory can move)."""

import json
from pathlib import Path


def load_facts(**_metadata):
    import datasets

    lines = (Path(__file__).with_name("facts.jsonl")).read_text().splitlines()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(line) for line in lines if line])})
