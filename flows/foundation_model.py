"""The documented name of Tessera's client, `from flows import foundation_model as fm` (the README's): the client
package itself under that name, so both names are one module."""

import sys

import client

sys.modules[__name__] = client
