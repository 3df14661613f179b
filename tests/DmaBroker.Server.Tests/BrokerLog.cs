using System.Collections.Concurrent;
using Microsoft.Extensions.Logging;

namespace DmaBroker.Server.Tests;

/// <summary>One line the broker logged, with its structured fields (a [LoggerMessage]'s parameters by name).</summary>
public sealed record BrokerLogRecord(LogLevel Level, EventId EventId, string Category, string Message, Exception? Exception,
    IReadOnlyDictionary<string, object?> Fields)
{
    public override string ToString() =>
        $"{Level} {Category}[{EventId.Id}]: {Message}{(Exception is null ? "" : "\n" + Exception)}";
}

/// <summary>
/// A logging provider that keeps everything the broker logs, so that a test fails when the broker
/// logs an error (or worse) that the test did not declare expected, as grpc-dotnet's
/// <c>VerifyNoErrorsScope</c> does: an INTERNAL the client never looks at, or a background task
/// that failed after the test's last assertion, still turns the test red.
/// </summary>
public sealed class BrokerLog : ILoggerProvider
{
    private readonly ConcurrentQueue<BrokerLogRecord> _records = new();
    private readonly ConcurrentQueue<Func<BrokerLogRecord, bool>> _expected = new();

    /// <summary>Everything logged so far, in order.</summary>
    public IReadOnlyCollection<BrokerLogRecord> Records => _records;

    /// <summary>Declares errors matching <paramref name="match"/> expected: they do not fail the test.</summary>
    public void ExpectErrors(Func<BrokerLogRecord, bool> match) => _expected.Enqueue(match);

    /// <summary>The records at <see cref="LogLevel.Error"/> or above that no declaration matches.</summary>
    public IReadOnlyList<BrokerLogRecord> UnexpectedErrors() =>
        [.. _records.Where(r => r.Level >= LogLevel.Error && !_expected.Any(match => match(r)))];

    /// <summary>Fails, printing every record (the lines before an error are often its cause), if an unexpected error was logged.</summary>
    public void VerifyNoUnexpectedErrors()
    {
        var unexpected = UnexpectedErrors();
        if (unexpected.Count > 0)
        {
            throw new Xunit.Sdk.XunitException(
                $"the broker logged {unexpected.Count} error(s) the test did not expect (declare an expected one with ExpectErrors);"
                + $" any failure of the test itself is replaced by this one. Everything it logged:\n{string.Join('\n', _records)}");
        }
    }

    public ILogger CreateLogger(string categoryName) => new Logger(this, categoryName);

    public void Dispose()
    {
        // The records stay readable after the host that logged them is gone.
    }

    private sealed class Logger(BrokerLog log, string category) : ILogger
    {
        public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;

        // The host's filters (the Logging:LogLevel settings) already chose what reaches this logger.
        public bool IsEnabled(LogLevel logLevel) => logLevel != LogLevel.None;

        public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter) =>
            log._records.Enqueue(new BrokerLogRecord(logLevel, eventId, category, formatter(state, exception), exception,
                (state as IEnumerable<KeyValuePair<string, object?>>)?.ToDictionary() ?? []));
    }
}
