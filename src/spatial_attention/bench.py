"""Placeholder while the bench module is written (replaced in this session)."""


def add_arguments(parser):
    pass


def run(args):
    raise NotImplementedError("bench")


def add_evaluate_arguments(parser):
    pass


def run_evaluate(args):
    raise NotImplementedError("evaluate")
