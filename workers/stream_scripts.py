"""Lua scripts that make a job's last step atomic on the Redis/Valkey server.

Writing the result, marking the job done and acknowledging the entry happen in one script, so a
crash between them cannot leave a result without an ack or an ack without a result, and two
consumers that both scored a job (one of them after reclaiming it) write one result between them.

Each entry also gets a "settled" marker when it is answered, result or dead letter: a consumer that
dead-letters an entry (too many deliveries, say) while another is still scoring it cannot give the
entry both a result and a dead letter, whichever script runs first wins.
"""

from __future__ import annotations

# KEYS: done marker, results stream, jobs stream, settled marker of the entry
# ARGV: entry id, group, done ttl (s), results maxlen, result JSON
# Returns 1 if the result was written, 0 if the job or the entry already had an answer.
COMMIT_RESULT = """
if redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('XACK', KEYS[3], ARGV[2], ARGV[1])
  return 0
end
local first = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', tonumber(ARGV[3]))
if first then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', tonumber(ARGV[4]), '*', 'result', ARGV[5])
end
redis.call('SET', KEYS[4], 'result', 'EX', tonumber(ARGV[3]))
redis.call('XACK', KEYS[3], ARGV[2], ARGV[1])
if first then return 1 else return 0 end
"""

# KEYS: dead stream, jobs stream, settled marker of the entry
# ARGV: entry id, group, dead maxlen, dead-letter JSON, settled ttl (s)
# Returns 1 if the dead letter was written, 0 if the entry already had an answer.
COMMIT_DEAD = """
local first = redis.call('SET', KEYS[3], 'dead', 'NX', 'EX', tonumber(ARGV[5]))
if first then
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', tonumber(ARGV[3]), '*', 'dead', ARGV[4])
end
redis.call('XACK', KEYS[2], ARGV[2], ARGV[1])
if first then return 1 else return 0 end
"""
