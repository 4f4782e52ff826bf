-- What inbound.lua and outbound.lua share: reading the -D globals, miltertest's error convention, and a
-- milter session sent the way Postfix's smtpd sends it.  Loaded with dofile(lib), where the test passes
-- -D lib=/path/to/session.lua; returns a table of the functions.

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

-- A milter SMTP session as Postfix's smtpd runs it; steps the milter negotiated away are skipped,
-- as Postfix skips them (miltertest errors on them instead).  daemon_name is "mx.example.test" on the MX
-- listener and "ORIGINATING" on the submission port, as in Postfix's master.cf; the client is a customer's
-- mail server or an agent's PC.
local function connect(daemon_name, client_host, client_ip)
	local conn = mt.connect(need("socket"), 40, 0.25)
	if conn == nil then
		error("mt.connect(" .. need("socket") .. ") failed", 0)
	end
	ok(mt.negotiate(conn, nil, nil, nil), "mt.negotiate")
	ok(mt.macro(conn, SMFIC_CONNECT,
		"j", "mx.example.test",
		"{daemon_name}", daemon_name,
		"v", "Postfix 3.7"), "mt.macro(connect)")
	if not mt.test_option(conn, SMFIP_NOCONNECT) then
		ok(mt.conninfo(conn, client_host, client_ip), "mt.conninfo")
	end
	if not mt.test_option(conn, SMFIP_NOHELO) then
		ok(mt.helo(conn, client_host), "mt.helo")
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

return {
	value = value,
	need = need,
	ok = ok,
	brackets = brackets,
	reply_name = reply_name,
	connect = connect,
	send = send,
}
