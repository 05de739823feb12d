"""The code location's console logger: Dagster's own (`dg.colored_console_logger`), with one switch more.

`emo-assets materialize` turns `failures` off for its runs: its run report states each failed step in one line
with the reason (the validator's `FILE:LINE: field: reason`), where Dagster's console would print the same
failure again with its stack traces, about a hundred lines. Warnings still reach the console. Runs started any
other way (the UI, `dagster job launch`) keep Dagster's behaviour; every event, stack traces included, stays in the
run's event log either way.
"""

import logging

import dagster as dg

CONSOLE = "console"  # the name Dagster gives its default logger, so run config written for it still applies


@dg.logger(
    {
        "log_level": dg.Field(str, is_required=False, default_value="DEBUG", description="The logger's threshold."),
        "name": dg.Field(str, is_required=False, default_value="dagster", description="The logger's name."),
        "failures": dg.Field(
            bool, is_required=False, default_value=True, description="Print ERROR records (failures) too."
        ),
    },
    description="Dagster's colored console logger; `failures: false` leaves out failures and their stack traces.",
)
def console_logger(init_context: dg.InitLoggerContext) -> logging.Logger:
    logger = dg.colored_console_logger.logger_fn(init_context)  # reads log_level and name
    if not init_context.logger_config["failures"]:
        logger.addFilter(lambda record: record.levelno < logging.ERROR)
    return logger


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions(loggers={CONSOLE: console_logger})
