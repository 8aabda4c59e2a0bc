# models first: it completes itself with webhooks.py, which builds on its base types.
from . import models as models
