-- One agent reply (or a mail that only looks like one) through the real `postroom milter`, sent the way
-- Postfix's smtpd sends a submission, and postroom's end-of-message answer checked.  Run by
-- tests/test_miltertest_outbound.py, after tests/miltertest/inbound.lua has opened the ticket:
--
--   miltertest -vv -D socket=unix:/path/milter.sock -D qid=4ABC123 -D auth_login=meier -D expect=sent ... -s outbound.lua
--
-- Everything scenario-specific arrives as a -D global (miltertest defines each as a Lua string):
--   socket, qid                                  where the milter listens; the Postfix queue id
--   env_from, rcpt, header_from, subject,
--   message_id, body                             the mail (envelope addresses without <>; body with CRLF)
--   in_reply_to, forged_owner, auth_login        optional: threading header, a forged X-Postroom-Owner
--                                                header, the SMTP AUTH login ({auth_authen}, sent with MAIL)
--   expect                                       "sent", "refused", "tempfail" or "untouched"
--   new_from, reply_to, new_subject, team_copy   for expect=sent: the rewritten From, the Reply-To, the
--                                                subject with its token, the recipient of the team's copy
--   reply_code, reply_status, reply_text         for expect=refused and tempfail: the SMTP reply
--                                                (team_copy for every expect: it must not be added then)
--
-- What miltertest cannot check, the Python side checks from miltertest's -vv trace: it has no eom_check for
-- SMFIR_CHGFROM (the envelope sender change), only the wire trace shows it ("cmd e, len N").
--
-- Debian's miltertest exits 1 without printing a Lua error, so the body runs under pcall and the
-- error is printed here.

-- miltertest defines SMFIC_* only for connect, helo, mail and rcpt; Postfix sends the end-of-message
-- macros ({i}) with command 'E' (SMFIC_BODYEOB) right before the end of the message.
local SMFIC_BODYEOB = string.byte("E")

local REPLY_NAMES = {
	[SMFIR_ACCEPT] = "accept",
	[SMFIR_CONTINUE] = "continue",
	[SMFIR_REJECT] = "reject",
	[SMFIR_TEMPFAIL] = "tempfail",
	[SMFIR_DISCARD] = "discard",
	[SMFIR_REPLYCODE] = "replycode",
}

local function value(name)
	local v = _G[name]
	if v == nil or v == "" then
		return nil
	end
	return v
end

local function need(name)
	local v = value(name)
	if v == nil then
		error("missing -D " .. name .. "=...", 0)
	end
	return v
end

local function ok(err, step)
	-- miltertest functions return nil on success and an error string on failure.
	if err ~= nil then
		error(step .. ": " .. tostring(err), 0)
	end
end

local function brackets(address)
	return "<" .. address .. ">"
end

local function reply_name(conn)
	local r = mt.getreply(conn)
	return REPLY_NAMES[r] or string.format("%q", string.char(r))
end

-- A milter SMTP session as Postfix's smtpd runs it on the submission port; steps the milter negotiated
-- away are skipped, as Postfix skips them (miltertest errors on them instead).
local function connect()
	local conn = mt.connect(need("socket"), 40, 0.25)
	if conn == nil then
		error("mt.connect(" .. need("socket") .. ") failed", 0)
	end
	ok(mt.negotiate(conn, nil, nil, nil), "mt.negotiate")
	ok(mt.macro(conn, SMFIC_CONNECT,
		"j", "mx.example.test",
		"{daemon_name}", "ORIGINATING",
		"v", "Postfix 3.7"), "mt.macro(connect)")
	if not mt.test_option(conn, SMFIP_NOCONNECT) then
		ok(mt.conninfo(conn, "agent-pc.example.test", "192.0.2.80"), "mt.conninfo")
	end
	if not mt.test_option(conn, SMFIP_NOHELO) then
		ok(mt.helo(conn, "agent-pc.example.test"), "mt.helo")
	end
	return conn
end

local function send(conn, headers, body)
	local env_from = need("env_from")
	-- {auth_authen} comes with MAIL FROM, and only after a successful AUTH; {i} does not exist yet.
	if value("auth_login") then
		ok(mt.macro(conn, SMFIC_MAIL,
			"{mail_addr}", env_from,
			"{auth_type}", "PLAIN",
			"{auth_authen}", value("auth_login")), "mt.macro(mail)")
	else
		ok(mt.macro(conn, SMFIC_MAIL, "{mail_addr}", env_from), "mt.macro(mail)")
	end
	if not mt.test_option(conn, SMFIP_NOMAIL) then
		ok(mt.mailfrom(conn, brackets(env_from)), "mt.mailfrom")
		if mt.getreply(conn) ~= SMFIR_CONTINUE then
			error("MAIL FROM answered " .. reply_name(conn), 0)
		end
	end
	ok(mt.macro(conn, SMFIC_RCPT, "{rcpt_addr}", need("rcpt")), "mt.macro(rcpt)")
	if not mt.test_option(conn, SMFIP_NORCPT) then
		ok(mt.rcptto(conn, brackets(need("rcpt"))), "mt.rcptto")
	end
	if not mt.test_option(conn, SMFIP_NOHDRS) then
		for _, h in ipairs(headers) do
			ok(mt.header(conn, h[1], h[2]), "mt.header(" .. h[1] .. ")")
		end
	end
	if not mt.test_option(conn, SMFIP_NOEOH) then
		ok(mt.eoh(conn), "mt.eoh")
	end
	if not mt.test_option(conn, SMFIP_NOBODY) then
		ok(mt.bodystring(conn, body), "mt.bodystring")
	end
	-- Postfix names the queue id macro "i"; libmilter answers getsymval("{i}") with it.
	ok(mt.macro(conn, SMFIC_BODYEOB, "i", need("qid")), "mt.macro(eom)")
	-- The Python side cuts the -vv trace here: what miltertest reads after this line is the milter's EOM answer.
	mt.echo("-- eom --")
	ok(mt.eom(conn), "mt.eom")
	mt.echo("-- end of eom --")
end

-- Every failed expectation is collected, so one run reports all of them.
local failures = {}

local function expect(cond, what)
	if not cond then
		table.insert(failures, what)
	end
end

local SHOWN_HEADERS = {
	"DKIM-Signature", "Reply-To", "Message-ID",
	"X-Postroom-Ticket", "X-Postroom-Owner", "X-Postroom-State", "X-Postroom-Status",
}

-- miltertest cannot list the captured edits; show at least the headers postroom added or inserted
-- (mt.getheader finds both).  The Python side reads the DKIM-Signature value from this.
local function added_headers(conn)
	local lines = {}
	for _, name in ipairs(SHOWN_HEADERS) do
		local n = 0
		while true do
			local v = mt.getheader(conn, name, n)
			if v == nil then
				break
			end
			table.insert(lines, string.format("  added %s: %s", name, v))
			n = n + 1
		end
	end
	return table.concat(lines, "\n")
end

-- None of the edits of a sent reply: what a refused, tempfailed or untrusted mail must not get.
local function expect_no_reply_edits(conn)
	expect(not mt.eom_check(conn, MT_HDRCHANGE, "From"), "From changed")
	expect(not mt.eom_check(conn, MT_HDRCHANGE, "Subject"), "Subject changed")
	expect(not mt.eom_check(conn, MT_HDRINSERT), "a header was inserted")
	expect(not mt.eom_check(conn, MT_HDRADD), "a header was added")
	expect(mt.getheader(conn, "DKIM-Signature", 0) == nil, "DKIM-Signature added")
	local copy = brackets(need("team_copy"))
	expect(not mt.eom_check(conn, MT_RCPTADD, copy), "team copy recipient " .. copy .. " added")
	local rcpt = brackets(need("rcpt"))
	expect(not mt.eom_check(conn, MT_RCPTDELETE, rcpt), "recipient " .. rcpt .. " deleted")
end

local function check_sent(conn)
	expect(mt.getreply(conn) == SMFIR_ACCEPT, "end of message answered " .. reply_name(conn) .. ", not accept")
	local from = need("new_from")
	expect(mt.eom_check(conn, MT_HDRCHANGE, "From", from), "From not changed to " .. from)
	local reply_to = need("reply_to")
	expect(mt.eom_check(conn, MT_HDRADD, "Reply-To", reply_to), "Reply-To " .. reply_to .. " not added")
	local subject = need("new_subject")
	expect(mt.eom_check(conn, MT_HDRCHANGE, "Subject", subject), "Subject not changed to " .. subject)
	-- The signature goes on top (smfi_insheader at index 0, SMFIR_INSHEADER), not below the other headers.
	local sig = mt.getheader(conn, "DKIM-Signature", 0)
	expect(sig ~= nil, "no DKIM-Signature added or inserted")
	if sig ~= nil then
		expect(mt.eom_check(conn, MT_HDRINSERT, "DKIM-Signature", sig, 0), "DKIM-Signature not inserted at index 0")
		expect(not mt.eom_check(conn, MT_HDRADD, "DKIM-Signature"), "DKIM-Signature appended, not inserted")
		expect(mt.getheader(conn, "DKIM-Signature", 1) == nil, "more than one DKIM-Signature")
	end
	local copy = brackets(need("team_copy"))
	expect(mt.eom_check(conn, MT_RCPTADD, copy), "team copy recipient " .. copy .. " not added")
	local rcpt = brackets(need("rcpt"))
	expect(not mt.eom_check(conn, MT_RCPTDELETE, rcpt), "recipient " .. rcpt .. " deleted")
	-- Only postroom may say who owns a ticket: the internal headers leave the mail, the client's copy too.
	expect(not mt.eom_check(conn, MT_HDRADD, "X-Postroom-Owner"), "X-Postroom-Owner added to an outgoing reply")
	if value("forged_owner") then
		expect(mt.eom_check(conn, MT_HDRDELETE, "X-Postroom-Owner", 1), "forged X-Postroom-Owner #1 not deleted")
	else
		expect(not mt.eom_check(conn, MT_HDRDELETE), "a header was deleted though none was forged")
	end
	if value("new_body") then
		expect(mt.eom_check(conn, MT_BODYCHANGE, value("new_body")), "body not replaced by -D new_body")
	else
		expect(not mt.eom_check(conn, MT_BODYCHANGE), "body replaced")
	end
end

local function check_reply(conn)
	-- libmilter sends smfi_setreply's text as SMFIR_REPLYCODE in place of SMFIR_REJECT / SMFIR_TEMPFAIL.
	expect(mt.getreply(conn) == SMFIR_REPLYCODE, "end of message answered " .. reply_name(conn) .. ", not replycode")
	-- MT_SMTPREPLY builds "code status text" and compares it with the whole reply line by strcmp; the one-
	-- and two-parameter forms the manual offers format the missing parts from NULL and never match postroom's
	-- reply, so the text is always given in full (and exactly: minute of "since" included).
	local code, status, text = need("reply_code"), need("reply_status"), need("reply_text")
	expect(mt.eom_check(conn, MT_SMTPREPLY, code, status, text),
		"SMTP reply is not: " .. code .. " " .. status .. " " .. text)
	expect_no_reply_edits(conn)
end

local function check_untouched(conn)
	expect(mt.getreply(conn) == SMFIR_ACCEPT, "end of message answered " .. reply_name(conn) .. ", not accept")
	expect(not mt.eom_check(conn, MT_HDRCHANGE), "a header was changed or deleted")
	expect_no_reply_edits(conn)
end

local CHECKS = { sent = check_sent, refused = check_reply, tempfail = check_reply, untouched = check_untouched }

local function main()
	mt.set_timeout(30)
	local check = CHECKS[need("expect")]
	if check == nil then
		error("unknown -D expect=" .. need("expect"), 0)
	end
	local headers = {
		{ "From", need("header_from") },
		{ "To", need("rcpt") },
		{ "Subject", need("subject") },
		{ "Message-ID", need("message_id") },
		{ "Date", "Mon, 02 Jun 2025 11:00:00 +0200" },
		{ "MIME-Version", "1.0" },
		{ "Content-Type", "text/plain; charset=utf-8" },
		{ "User-Agent", "Thunderbird 128" },
	}
	if value("in_reply_to") then
		table.insert(headers, { "In-Reply-To", value("in_reply_to") })
		table.insert(headers, { "References", value("in_reply_to") })
	end
	if value("forged_owner") then
		table.insert(headers, { "X-Postroom-Owner", value("forged_owner") })
	end

	local conn = connect()
	send(conn, headers, need("body"))
	check(conn)
	local reply, added = reply_name(conn), added_headers(conn)
	mt.disconnect(conn)
	if #failures > 0 then
		error(table.concat(failures, "\n") .. "\n" .. added, 0)
	end
	mt.echo("ok: " .. need("expect") .. ", " .. reply .. "\n" .. added)
end

local passed, err = pcall(main)
if not passed then
	print("FAILED: " .. tostring(err))
	error(err, 0)
end
