"""qsmprep: quantitative susceptibility mapping as a BIDS App."""
import os

# Nipype checks for updates over the network when imported unless this is set.
os.environ.setdefault('NIPYPE_NO_ET', '1')

__version__ = '0.1.0'
