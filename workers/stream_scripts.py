"""Lua scripts that make a job's last step atomic on the Redis/Valkey server.

Writing the result, marking the job done and acknowledging the entry happen in one script, so a
crash between them cannot leave a result without an ack or an ack without a result, and two
consumers that both scored a job (one of them after reclaiming it) write one result between them.

Each entry also gets a "settled" marker when it is answered, result or dead letter: a consumer that
dead-letters an entry (too many deliveries, say) while another is still scoring it cannot give the
entry both a result and a dead letter, whichever script runs first wins. Both scripts release the
job's owner marker (`StreamNames.owner_marker`) when the answering entry holds it.
"""

from __future__ import annotations

DONE_BY_ANOTHER_ENTRY = 2
"""`COMMIT_RESULT`'s answer when the job's done marker names another entry."""

# KEYS: done marker, results stream, jobs stream, settled marker of the entry, owner marker of the job
# ARGV: entry id, group, done ttl (s), results maxlen, result JSON, owner value ("<stream> <entry id>")
# Returns 1 if the result was written; 0 if the entry already had an answer (acknowledged again);
# 2 if another entry holds the job's result: nothing written or acknowledged, the caller dead-letters
# this entry as a duplicate.
COMMIT_RESULT = """
local function release_owner()
  if redis.call('GET', KEYS[5]) == ARGV[6] then
    redis.call('DEL', KEYS[5])
  end
end
if redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('XACK', KEYS[3], ARGV[2], ARGV[1])
  release_owner()
  return 0
end
local done = redis.call('GET', KEYS[1])
if done and done ~= ARGV[1] then
  return 2
end
if not done then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[3]))
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', tonumber(ARGV[4]), '*', 'result', ARGV[5])
end
redis.call('SET', KEYS[4], 'result', 'EX', tonumber(ARGV[3]))
redis.call('XACK', KEYS[3], ARGV[2], ARGV[1])
release_owner()
if done then return 0 else return 1 end
"""

# KEYS: dead stream, jobs stream, settled marker of the entry[, owner marker of the job]
# ARGV: entry id, group, dead maxlen, dead-letter JSON, settled ttl (s)[, owner value]
# Returns 1 if the dead letter was written, 0 if the entry already had an answer. The owner marker, when
# given and held by this entry, is released: the job's id is free for a corrected job.
COMMIT_DEAD = """
local first = redis.call('SET', KEYS[3], 'dead', 'NX', 'EX', tonumber(ARGV[5]))
if first then
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', tonumber(ARGV[3]), '*', 'dead', ARGV[4])
end
redis.call('XACK', KEYS[2], ARGV[2], ARGV[1])
if #KEYS >= 4 and redis.call('GET', KEYS[4]) == ARGV[6] then
  redis.call('DEL', KEYS[4])
end
if first then return 1 else return 0 end
"""
