"""The statement policy engine of the database connector: what a SQL string does
(`parse`, PostgreSQL's own grammar through pglast) and whether an agent may run it
(`StatementRules.judge`). It knows no wire protocol: the PostgreSQL listener and the
HTTP face (`/_db/<name>/query`) both translate its Verdict into their own refusal."""

from .kinds import KINDS
from .names import identifier, table_glob
from .parse import Access, Statement, StatementError, parse
from .rules import RuleLike, StatementRules
from .verdict import Verdict

__all__ = [
    "KINDS",
    "Access",
    "RuleLike",
    "Statement",
    "StatementError",
    "StatementRules",
    "Verdict",
    "identifier",
    "parse",
    "table_glob",
]
