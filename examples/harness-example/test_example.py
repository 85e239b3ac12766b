"""The example package's own tests: the harness's conformance checks, as a third party runs them."""

from harness.testing import check_dataset, check_method
from harness_example.plugin import harness_datasets, harness_methods


def test_patchnn_follows_the_method_contract(tmp_path):
    (spec,) = harness_methods()
    check_method(spec, profile="tiny", workdir=tmp_path)


def test_checkers_follows_the_dataset_contract():
    (spec,) = harness_datasets()
    check_dataset(spec)
