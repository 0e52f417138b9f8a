"""The zeotwist client: the Deferred API, its cache, and the blocking ClientStorage.

Its first module imports Twisted's transports without pyOpenSSL, which they
get back when TLS is first used (:mod:`zeotwist.lazytls`).
"""
from zeotwist.lazytls import plain_before

plain_before(__name__)
